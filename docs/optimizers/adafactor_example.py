"""AdaFactor, paper defaults, on a small regression. Run by tests/docs/test_docs.py."""

import torch

import optimfx

torch.manual_seed(0)
x = torch.randn(128, 20)
y = x @ torch.randn(20, 1) + 0.1 * torch.randn(128, 1)
model = torch.nn.Sequential(
    torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
)

# lr=None: the relative step min(1e-2, 1/sqrt(t)) times max(1e-3, RMS(param))
opt = optimfx.AdaFactor(model.parameters())

first = torch.nn.functional.mse_loss(model(x), y).item()
for step in range(100):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()

print(f"loss {first:.3f} -> {loss.item():.3f}")
assert loss.item() < 0.25 * first

# a matrix keeps a row and a column statistic; a vector a full second moment
weight, bias = model[0].weight, model[0].bias  # [64, 20] and [64]
assert opt.state[weight]["exp_avg_sq_row"].shape == (64,)
assert opt.state[weight]["exp_avg_sq_col"].shape == (20,)
assert opt.state[bias]["exp_avg_sq"].shape == (64,)
