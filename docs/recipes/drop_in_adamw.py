"""Swap torch.optim.AdamW for optimfx.AdaXW or AdaFactor. Run by tests/docs/test_docs.py."""

import torch

import optimfx

NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm,
         torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights decay; biases and normalisation parameters do not."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name.endswith("bias") or isinstance(module, NORMS):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(100, 32),
        torch.nn.TransformerEncoderLayer(
            32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        ),
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, 100),
    )


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 5):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 100, (8, 12), generator=gen)
    for _ in range(steps):
        logits = model(tokens[:, :-1]).flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


# before
model = make_model()
opt = torch.optim.AdamW(param_groups(model, weight_decay=1e-2), lr=1e-3)
train(model, opt)

# after: AdaX-W (the official AdaXW defaults are lr=5e-3, weight_decay=5e-2)
model = make_model()
opt = optimfx.AdaXW(param_groups(model, weight_decay=5e-2), lr=5e-3)
train(model, opt)

# after: AdaFactor with the paper's relative step (no lr to tune);
# its weight decay is theta <- theta - wd * alpha_t * theta
model = make_model()
opt = optimfx.AdaFactor(param_groups(model, weight_decay=1e-2))
train(model, opt)

# the groups are what torch.optim would hold: no decay on biases and norms
no_decay = opt.param_groups[1]
assert no_decay["weight_decay"] == 0.0
assert any(p is model[2].weight for p in no_decay["params"])  # LayerNorm weight
assert all(p.ndim == 2 for p in opt.param_groups[0]["params"])

# checkpoints round-trip like any torch.optim optimizer
restored = optimfx.AdaFactor(param_groups(model, weight_decay=1e-2))
restored.load_state_dict(opt.state_dict())
for saved, loaded in zip(opt.param_groups, restored.param_groups):
    assert all(loaded[k] == v for k, v in saved.items() if k != "params")
for p in model.parameters():
    for key, value in opt.state[p].items():
        assert torch.equal(restored.state[p][key], value)
