"""GradScaler with an optimfx optimizer; a step with inf gradients changes nothing. Run by tests/docs/test_docs.py."""

import torch

import optimfx

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
opt = optimfx.AdaXW(model.parameters(), lr=1e-3, weight_decay=1e-2)
scaler = torch.amp.GradScaler(device)

for step in range(6):
    x, y = torch.randn(8, 16, device=device), torch.randn(8, 4, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    if step == 3:  # an overflowing batch
        model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        steps_before = int(opt.state[model[0].weight]["step"])
    scaler.step(opt)  # optimfx unscales and checks on its own: no extra pass, no host sync on CUDA
    scaler.update()
    if step == 3:
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert int(opt.state[model[0].weight]["step"]) == steps_before

assert int(opt.state[model[0].weight]["step"]) == 5  # six batches, one skipped
print(f"scale {scaler.get_scale():.0f}, loss {loss.item():.4f}")
