"""torch.compile of a training step that calls opt.step(), with a scheduled tensor lr. Run by tests/docs/test_docs.py."""

import torch
from torch._dynamo.utils import counters

import optimfx

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
# a tensor lr: the scheduler writes it in place, so no new value is ever baked into a graph
opt = optimfx.AdaFactor(model.parameters(), lr=torch.tensor(1e-3), relative_step=False)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))


# CI runs this page with Dynamo's "eager" backend (seconds on a CPU); use plain @torch.compile (inductor)
@torch.compile(backend="eager")
def train_step(x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


for step in range(8):
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    if step == 2:  # warmed up: the first step creates the state, the second sees it
        graphs = counters["stats"]["unique_graphs"]
        torch.compiler.set_stance("fail_on_recompile")
    loss = train_step(x, y)
    sched.step()
torch.compiler.set_stance("default")

assert counters["stats"]["unique_graphs"] == graphs
print(f"{graphs} graphs, loss {loss.item():.4f}")
