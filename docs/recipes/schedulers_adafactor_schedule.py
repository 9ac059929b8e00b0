"""transformers' AdafactorSchedule on optimfx.AdaFactor. Run by tests/docs/test_docs.py."""

import torch
from transformers.optimization import AdafactorSchedule

import optimfx

torch.manual_seed(0)
model = torch.nn.Linear(32, 16)
# the combination transformers' Adafactor docstring recommends, unchanged but for the class
opt = optimfx.AdaFactor(model.parameters(), scale_parameter=True, relative_step=True, warmup_init=True, lr=None)
# initial_lr=1.0: the value the scheduler writes before the first step is the multiplier 1.0
sched = AdafactorSchedule(opt, initial_lr=1.0)

for step in range(1, 4):
    model(torch.randn(8, 32)).square().mean().backward()
    opt.step()
    sched.step()  # before zero_grad: it reads the step size of groups whose first parameter has a grad
    opt.zero_grad()
    # it logs the step size alpha_t = rho_t * max(eps2, RMS(weight)), rho_t = min(1e-6 t, 1/sqrt t)
    rms = model.weight.detach().square().mean().sqrt().item()
    assert abs(sched.get_last_lr()[0] - 1e-6 * step * max(1e-3, rms)) < 1e-12

# the value it wrote into the group's lr is logged, not applied
assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
assert opt.param_groups[0]["lr_is_logged_step_size"]
