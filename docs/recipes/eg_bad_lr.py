"""EG step-size adaptation with a learning rate 300x too small. Run by tests/docs/test_docs.py."""

import torch

import optimfx

torch.manual_seed(0)
x = torch.randn(256, 20)
y = torch.tanh(x @ torch.randn(20, 1)) + 0.05 * torch.randn(256, 1)


def train(make_optimizer, steps=200, log_every=0):
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )
    opt = make_optimizer(model.parameters())
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            # mean/min/max of the per-tensor scales s_t of group 0 (host reads: logging only)
            s = opt.scale_stats()[0]
            print(f"step {step:3d}  loss {loss.item():.4f}  "
                  f"scale {s['scale_min']:.3g}..{s['scale_max']:.3g}  gain {s['gain_mean']:.3g}")
    return loss.item()


# lr=0.3 is the best of 0.01, 0.03, 0.1, 0.3, 1 for this problem (1 diverges)
tuned = train(lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9))
too_small = train(lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9))
# the same bad lr with EG around SGD (Funnel: EG's velocity is the momentum);
# gamma_scale=0.1 lets the scale grow by up to e^0.1 per step
rescued = train(
    lambda ps: optimfx.Funnel(ps, lr=1e-3, momentum=0.9, gamma_scale=0.1),
    log_every=50,
)
print(f"SGD lr=0.3: {tuned:.4f}   SGD lr=1e-3: {too_small:.4f}   "
      f"Funnel lr=1e-3: {rescued:.4f}")
assert rescued < 0.25 * too_small  # EG found a much larger step...
assert rescued < 2 * tuned  # ...as good as the tuned one, within 2x
