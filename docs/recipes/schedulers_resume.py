"""Checkpoint and resume an optimizer with its scheduler. Run by tests/docs/test_docs.py."""

import io

import torch

import optimfx


def warmup_cosine(opt: torch.optim.Optimizer):
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=16, eta_min=0.1)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], [4])


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    opt = optimfx.AdaFactor(model.parameters())
    return model, opt, warmup_cosine(opt)


def train(model, opt, sched, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


# an uninterrupted run of 12 steps
model, opt, sched = build()
train(model, opt, sched, range(12))
expected = [p.detach().clone() for p in model.parameters()]

# 6 steps, save, then resume (fresh objects stand for a fresh process)
model, opt, sched = build()
train(model, opt, sched, range(6))
buffer = io.BytesIO()
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict()}, buffer)

buffer.seek(0)
ckpt = torch.load(buffer)
model, opt, sched = build()              # 1. model, optimizer AND scheduler
model.load_state_dict(ckpt["model"])
opt.load_state_dict(ckpt["optimizer"])   # 2. optimizer state: lr, initial_lr
sched.load_state_dict(ckpt["scheduler"])  # 3. scheduler state
train(model, opt, sched, range(6, 12))

for got, want in zip(model.parameters(), expected):
    assert torch.equal(got, want)

# the wrong order: schedulers built after loading overwrite the restored lr,
# and loading their state afterwards does not repair it
model, opt, _ = build()
opt.load_state_dict(ckpt["optimizer"])
sched = warmup_cosine(opt)
sched.load_state_dict(ckpt["scheduler"])
restored_lr = ckpt["optimizer"]["param_groups"][0]["lr"]
print(f"lr {opt.param_groups[0]['lr']:.3f} instead of {restored_lr:.3f}")
assert abs(opt.param_groups[0]["lr"] - restored_lr) > 0.5
