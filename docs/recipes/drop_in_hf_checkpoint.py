"""Continue a transformers Adafactor run with optimfx.AdaFactor.

Run by tests/docs/test_docs.py when ``transformers`` is installed (skipped otherwise).
"""

import copy

import torch
from transformers.optimization import Adafactor

import optimfx


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 24, generator=gen), torch.randn(16, 6, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 6)
)
# the paper's defaults: relative step, parameter scale, no momentum
hf_opt = Adafactor(model.parameters())
train(model, hf_opt, range(10))
checkpoint = copy.deepcopy(
    {"model": model.state_dict(), "optimizer": hf_opt.state_dict()}
)

# reference: transformers keeps training
train(model, hf_opt, range(10, 20))
expected = [p.detach().clone() for p in model.parameters()]

# migration: same keyword arguments, same state keys and shapes
# (exp_avg_sq_row / exp_avg_sq_col / exp_avg_sq / exp_avg / step)
model.load_state_dict(checkpoint["model"])
opt = optimfx.AdaFactor(model.parameters())
# transformers stores lr=None for its relative step; optimfx reads it as
# the multiplier 1.0
opt.load_state_dict(checkpoint["optimizer"])
assert opt.param_groups[0]["lr"] == 1.0
assert int(opt.state[model[0].weight]["step"]) == 10
train(model, opt, range(10, 20))

for got, want in zip(model.parameters(), expected):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
