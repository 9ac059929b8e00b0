"""AdaFactor's relative step under an LR scheduler. Run by tests/docs/test_docs.py."""

import copy

import torch

import optimfx


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 100)


torch.manual_seed(0)
model = torch.nn.Linear(32, 16)
# lr=None, relative_step=True: the paper's step size
opt = optimfx.AdaFactor(model.parameters())
# lr is stored as a multiplier of rho_t = min(1e-2, 1/sqrt(t))
assert opt.param_groups[0]["lr"] == 1.0

sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
assert opt.param_groups[0]["lr"] == 0.01  # step 1 takes 1% of the relative step

# the multiplier scales the whole update: half the multiplier, half the step
half = copy.deepcopy(model)
opt_half = optimfx.AdaFactor(half.parameters())
torch.optim.lr_scheduler.LambdaLR(opt_half, lambda step: 0.5 * warmup(step))
x = torch.randn(8, 32)
before = model.weight.detach().clone()
for m, o in ((model, opt), (half, opt_half)):
    m(x).square().mean().backward()
    o.step()
torch.testing.assert_close(half.weight - before, 0.5 * (model.weight - before))

sched.step()
assert opt.param_groups[0]["lr"] == 0.02
