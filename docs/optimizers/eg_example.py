"""EGStepSize around Adam, and Funnel (SGD, the paper's setting), on a small regression.

Run by tests/docs/test_docs.py.
"""

import torch

import optimfx

torch.manual_seed(0)
x = torch.randn(128, 20)
y = x @ torch.randn(20, 1) + 0.1 * torch.randn(128, 1)


def fit(make_optimizer, steps=100):
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    opt = make_optimizer(model.parameters())
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return model, opt, loss.item()


# any torch.optim optimizer: EG multiplies its step by a scale and gains;
# gamma_scale=0.1 (default 1e-2) lets the scale move e^0.1 per step, for short runs
_, adam_eg, adam_loss = fit(
    lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-3), gamma_scale=0.1)
)
# SGD + EG momentum: the paper's Funnel (lr is the SGD step, momentum is EG's)
model, funnel, funnel_loss = fit(
    lambda ps: optimfx.Funnel(ps, lr=0.01, momentum=0.9, gamma_scale=0.1)
)
print(f"final loss: Adam+EG {adam_loss:.4f}, Funnel {funnel_loss:.4f}")
# the loss starts near 25 (the mean square of the target)
assert adam_loss < 0.1 and funnel_loss < 0.05

# one scale per tensor (scope="tensor"), mean/min/max per group, always > 0
stats = funnel.scale_stats()[0]
print({k: round(v, 3) for k, v in stats.items()})
assert 0 < stats["scale_min"] <= stats["scale_max"]

# EG state: a 0-d scale and three fp32 tensors shaped like the parameter
state = funnel.state[model[0].weight]
assert sorted(state) == ["avg_grad", "gains", "scale", "velocity"]
assert state["scale"].ndim == 0 and state["gains"].shape == model[0].weight.shape
# the base optimizer's own state is in the wrapped optimizer (Adam: exp_avg, ...)
assert "exp_avg" in adam_eg.base.state[next(iter(adam_eg.base.state))]
