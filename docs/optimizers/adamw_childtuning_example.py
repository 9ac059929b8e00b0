"""ChildTuning-D with a Fisher mask on a small classifier. Run by tests/docs/test_docs.py."""

from collections import OrderedDict

import torch

import optimfx

torch.manual_seed(0)
x = torch.randn(256, 16)
y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
# named like a transformer: the Fisher mask covers parameters whose name has "layer"
model = torch.nn.Sequential(OrderedDict(
    layer1=torch.nn.Linear(16, 64), act=torch.nn.Tanh(),
    layer2=torch.nn.Linear(64, 64), act2=torch.nn.Tanh(),
    classifier=torch.nn.Linear(64, 3),
))


def loss_fn(model, batch):
    inputs, labels = batch
    return torch.nn.functional.cross_entropy(model(inputs), labels)


# one pass over the training data: keep the 30% of "layer" entries with the
# largest empirical Fisher information (one threshold across all of them)
masks = optimfx.build_fisher_mask(model, batches, loss_fn, reserve_p=0.3,
                                  max_grad_norm=1.0)
kept = sum(int(m.sum()) for m in masks.values())
total = sum(m.numel() for m in masks.values())
print(f"child network: {kept} of {total} 'layer' entries")

lr, weight_decay, steps = 1e-2, 0.01, 40
opt = optimfx.ChildTuningAdamW(model.parameters(), lr=lr,
                               weight_decay=weight_decay, mode="ChildTuning-D")
opt.set_gradient_mask(masks)

start = {name: p.detach().clone() for name, p in model.named_parameters()}
first = sum(loss_fn(model, b).item() for b in batches) / len(batches)
for step in range(steps):
    opt.zero_grad()
    loss_fn(model, batches[step % len(batches)]).backward()
    opt.step()
last = sum(loss_fn(model, b).item() for b in batches) / len(batches)
print(f"loss {first:.3f} -> {last:.3f}")
assert last < 0.7 * first

# entries outside the child network get no Adam step, only weight decay
decay = (1 - lr * weight_decay) ** steps
for name, p in model.named_parameters():
    if p in masks:
        frozen = ~masks[p]
        torch.testing.assert_close(p.detach()[frozen], start[name][frozen] * decay)
# tensors without a mask (here the classifier) train fully
assert not torch.allclose(model.classifier.weight, start["classifier.weight"] * decay)
# the mask lives in the optimizer state as uint8, so checkpoints carry it
assert opt.state[model.layer1.weight]["child_mask"].dtype == torch.uint8
