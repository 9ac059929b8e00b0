"""AdaXW on a small regression problem (CPU, seconds). Run by tests/docs/test_docs.py."""

import torch

import optimfx

torch.manual_seed(0)
x = torch.randn(128, 20)
y = x @ torch.randn(20, 1) + 0.1 * torch.randn(128, 1)
model = torch.nn.Sequential(
    torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
)

# the official AdaXW defaults: lr=5e-3, betas=(0.9, 1e-4), eps=1e-12,
# weight_decay=5e-2
opt = optimfx.AdaXW(model.parameters(), lr=5e-3, weight_decay=5e-2)

first = torch.nn.functional.mse_loss(model(x), y).item()
for step in range(100):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()

print(f"loss {first:.3f} -> {loss.item():.3f}")
assert loss.item() < 0.1 * first

# state: two fp32 tensors shaped like the parameter (8 bytes per element)
# and an int64 step counter
state = opt.state[model[0].weight]
assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
assert state["exp_avg_sq"].dtype == torch.float32
assert int(state["step"]) == 100
