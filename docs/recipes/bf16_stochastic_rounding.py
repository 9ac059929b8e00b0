"""bf16 weights, fp32 optimizer state, stochastic rounding. Run by tests/docs/test_docs.py."""

import torch

import optimfx

torch.manual_seed(0)
model = torch.nn.Linear(64, 64).to(torch.bfloat16)
opt = optimfx.AdaXW(
    [{"params": model.parameters(), "bf16_rounding": "stochastic", "rounding_seed": 1234}],
    lr=1e-4, weight_decay=0.0,
)
start = model.weight.detach().clone()
for _ in range(20):
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    opt.zero_grad()
    model(x).float().square().mean().backward()
    opt.step()

assert opt.state[model.weight]["exp_avg"].dtype == torch.float32  # state stays fp32
# steps of ~1e-4 are below half a bf16 ULP for most weights: round-to-nearest would keep them all
moved = (model.weight != start).float().mean().item()
assert moved > 0.5
print(f"{moved:.0%} of the bf16 weights moved")
