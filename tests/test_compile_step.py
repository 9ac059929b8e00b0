"""``torch.compile`` of a training step that calls ``opt.step()``, for every optimfx optimizer and wrapper, with a
tensor ``lr`` driven by an LR scheduler (the setup of PyTorch's compiled-optimizer recipe).

The optimizer update runs as one eager region of the compiled step (``_dispatch.run`` is
``torch.compiler.disable``d), with the exact float64 host scalars of eager mode, so:

* after the warm-up steps (the first creates state, the second sees it) nothing recompiles, whatever
  the step count and the scheduler's lr;
* the compiled run equals the eager run **bit for bit**. The tests compile with Dynamo's ``"eager"``
  backend, which runs the captured graph with the same kernels as eager PyTorch: the graphs and
  guards (hence recompiles) are Dynamo's and do not depend on the backend, while an inductor build
  of the model costs ~50 s per test on a 2-core CPU and rounds the model's own maths differently.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import optimfx

# one row per algorithm (AdaX runs AdaXW's class and step path) and per wrapper; each costs ~5 s of
# tracing. A row builds the optimizer from (params, tensor lr), on the reference backend.
OPTIMIZERS = {
    "AdaXW": lambda ps, lr: optimfx.AdaXW(ps, lr=lr, backend="reference"),
    "AdaFactor": lambda ps, lr: optimfx.AdaFactor(ps, lr=lr, relative_step=False, beta1=0.9, backend="reference"),
    "AdamW": lambda ps, lr: optimfx.AdamW(ps, lr=lr, backend="reference"),
    "ChildTuningAdamW-F": lambda ps, lr: optimfx.ChildTuningAdamW(ps, lr=lr, mode="ChildTuning-F", reserve_p=0.5,
                                                                  backend="reference"),
    "EGStepSize-AdaX": lambda ps, lr: optimfx.EGStepSize(optimfx.AdaX(ps, lr=lr, backend="reference"),
                                                         gamma_scale=0.1, backend="reference"),
    "ChildTuning-adapter-AdamW": lambda ps, lr: optimfx.ChildTuning(torch.optim.AdamW(ps, lr=lr),
                                                                    mode="ChildTuning-F", reserve_p=0.5),
}
WARM_UP, STEPS = 2, 5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _setup(name: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = OPTIMIZERS[name](model.parameters(), torch.tensor(1e-2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, opt, sched


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_training_step_stops_compiling_and_equals_eager(name):
    eager, compiled = _setup(name), _setup(name)
    step = torch.compile(_train_step, backend="eager")
    for i in range(STEPS):
        gen = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)
        if i == WARM_UP:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
        if i < WARM_UP:
            loss = step(compiled[0], compiled[1], x, y)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                loss = step(compiled[0], compiled[1], x, y)
        compiled[2].step()
        assert torch.equal(loss, _train_step(eager[0], eager[1], x, y))
        eager[2].step()
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled[1].param_groups[0]["lr"] == eager[1].param_groups[0]["lr"] != 1e-2
    for p, q in zip(compiled[0].parameters(), eager[0].parameters()):
        assert torch.equal(p, q)
        assert compiled[1].state[p].keys() == eager[1].state[q].keys()
        for key, value in compiled[1].state[p].items():
            assert torch.equal(value, eager[1].state[q][key]), key


def _graphs_after_warm_up(name: str, layers: int) -> int:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(layers)])
    opt = OPTIMIZERS[name](model.parameters(), torch.tensor(1e-2))
    step = torch.compile(_train_step, backend="eager")
    for i in range(WARM_UP):
        gen = torch.Generator().manual_seed(i)
        step(model, opt, torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen))
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", ["AdaFactor", "AdamW"])
def test_graphs_do_not_grow_with_the_number_of_parameters(name):
    """Creating the state of each parameter must not compile a frame per parameter: with 26 tensors
    that passed Dynamo's recompile limit (8) on AdaFactor's first step."""
    assert _graphs_after_warm_up(name, 13) == _graphs_after_warm_up(name, 2)
