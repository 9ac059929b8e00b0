"""optimfx.AdamW's conventions against torch.optim.AdamW, and F-mode masks. Run by tests/docs/test_docs.py."""

import copy

import torch

import optimfx


def train(model, opt, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 8, generator=gen)).square().mean().backward()
        opt.step()
    return model


torch.manual_seed(0)
base = torch.nn.Linear(8, 4)

# defaults: torch.optim.AdamW's numbers (decay first, eps on sqrt(v_hat))
model_fx, model_torch = copy.deepcopy(base), copy.deepcopy(base)
train(model_fx, optimfx.AdamW(model_fx.parameters(), lr=1e-2))
train(model_torch, torch.optim.AdamW(model_torch.parameters(), lr=1e-2))
torch.testing.assert_close(model_fx.weight, model_torch.weight)

# ChildTuningAdamW keeps the official code's conventions: the step first,
# then decay of the updated weights, and eps on sqrt(v). With reserve_p=1
# (no masking) it differs from AdamW only by those two conventions.
model_ct = copy.deepcopy(base)
train(model_ct, optimfx.ChildTuningAdamW(model_ct.parameters(), lr=1e-2,
                                         weight_decay=0.01, eps=1e-8))
gap = (model_ct.weight - model_fx.weight).abs().max().item()
print(f"largest difference after 5 steps: {gap:.1e}")
assert 0 < gap < 1e-5

# ChildTuning-F: a fresh Bernoulli(reserve_p) mask each step, the kept
# entries rescaled by 1/reserve_p. p.grad is never modified...
model = copy.deepcopy(base)
opt = optimfx.ChildTuningAdamW(model.parameters(), lr=1e-2,
                               mode="ChildTuning-F", reserve_p=0.3, seed=7)
model(torch.randn(16, 8)).square().mean().backward()
grad = model.weight.grad.clone()
opt.step()
assert torch.equal(model.weight.grad, grad)

# ...and the masks are a function of (seed, step, parameter, element): the
# same seed gives the same run, another seed another run
runs = []
for seed in (7, 7, 8):
    model = copy.deepcopy(base)
    train(model, optimfx.ChildTuningAdamW(model.parameters(), lr=1e-2,
                                          mode="ChildTuning-F", reserve_p=0.3,
                                          seed=seed))
    runs.append(model.weight.detach())
assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

# the adapter puts the same masks in front of any torch.optim optimizer
model = copy.deepcopy(base)
opt = optimfx.ChildTuning(torch.optim.SGD(model.parameters(), lr=0.1),
                          mode="F", reserve_p=0.3, seed=7)
train(model, opt)
