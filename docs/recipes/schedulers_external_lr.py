"""AdaFactor with an external lr and warm-up + cosine. Run by tests/docs/test_docs.py."""

import math

import torch

import optimfx


def warmup_cosine(warmup: int, total: int, floor: float = 0.0):
    """Multiplier: linear warm-up to 1, then a cosine down to ``floor``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
)
# the transformers docstring's fine-tuning setting: lr is the step size itself
opt = optimfx.AdaFactor(model.parameters(), lr=1e-3, relative_step=False,
                        scale_parameter=False, warmup_init=False)
sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup=10, total=50))

lrs = []
for step in range(50):
    x, y = torch.randn(16, 32), torch.randn(16, 8)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # optimizer first, then scheduler
    lrs.append(sched.get_last_lr()[0])
    sched.step()

assert math.isclose(max(lrs), 1e-3)  # peak right after warm-up
assert lrs[0] == 1e-4 and lrs[-1] < 1e-5
