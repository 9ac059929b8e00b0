"""optimfx.AdaFactor in torch.optim.Adafactor's mode. Run by tests/docs/test_docs.py."""

import copy

import torch

import optimfx

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
)
twin = copy.deepcopy(model)

# torch: lr=1e-2 caps the relative step, rho_t = min(lr, 1/sqrt(t));
# weight decay is theta *= 1 - lr * wd
torch_opt = torch.optim.Adafactor(model.parameters(), lr=1e-2, weight_decay=0.1)
fx_opt = optimfx.AdaFactor(
    twin.parameters(), lr=1e-2, eps=(None, 1e-3), weight_decay=0.1,
    lr_mode="rho_max", eps_mode="torch", decay_mode="torch",
)
cosine = torch.optim.lr_scheduler.CosineAnnealingLR
scheds = [cosine(torch_opt, T_max=20), cosine(fx_opt, T_max=20)]

x, y = torch.randn(64, 16), torch.randn(64, 4)
for _ in range(20):
    for m, opt, sched in zip((model, twin), (torch_opt, fx_opt), scheds):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        sched.step()

for a, b in zip(model.parameters(), twin.parameters()):
    torch.testing.assert_close(a, b)
