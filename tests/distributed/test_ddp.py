"""DDP with real gloo process groups (2 ranks, CPU): every optimizer leaves identical parameters on all ranks.

Each rank sees different data; DDP averages the gradients, so any rank-dependent randomness or
non-determinism in the optimizer (ChildTuning masks, EG reductions) would make the replicas drift.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from _dist_harness import run_ranks

import optimfx

STEPS = 12


def _d_masks(params):
    """Fixed ChildTuning-D masks, the same on every rank."""
    gen = torch.Generator().manual_seed(11)
    return {p: torch.rand(p.shape, generator=gen) < 0.5 for p in params}


def _with_masks(opt, params):
    opt.set_gradient_mask(_d_masks(params))
    return opt


OPTIMIZERS = {
    "adax": lambda ps: optimfx.AdaX(ps, lr=1e-2),
    "adaxw": lambda ps: optimfx.AdaXW(ps, lr=1e-2),
    "adafactor": lambda ps: optimfx.AdaFactor(ps),
    "adafactor-momentum": lambda ps: optimfx.AdaFactor(ps, beta1=0.9, weight_decay=0.1),
    "adamw": lambda ps: optimfx.AdamW(ps, lr=1e-2),
    "adamw-childtuning-f": lambda ps: optimfx.AdamW(ps, lr=1e-2, child_tuning_mode="F", reserve_p=0.3, seed=5),
    "childtuning-adamw-d": lambda ps: _with_masks(optimfx.ChildTuningAdamW(ps, lr=1e-2, mode="ChildTuning-D"), ps),
    "childtuning-adapter-f": lambda ps: optimfx.ChildTuning(torch.optim.SGD(ps, lr=0.1), "F", 0.5, seed=2),
    "childtuning-adapter-d": lambda ps: _with_masks(optimfx.ChildTuning(optimfx.AdaX(ps, lr=1e-2), "D"), ps),
    "eg-adax": lambda ps: optimfx.EGStepSize(optimfx.AdaX(ps, lr=1e-2), gamma_scale=0.3),
    "eg-global": lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-2), gamma_scale=0.3, scope="global"),
    "funnel": lambda ps: optimfx.Funnel(ps, lr=0.05),
}


def _worker(rank: int, out_dir: str) -> None:
    for name in OPTIMIZERS:
        _train(rank, name, out_dir)


def _train(rank: int, name: str, out_dir: str) -> None:
    torch.manual_seed(0)  # same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = OPTIMIZERS[name](list(ddp.parameters()))
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(STEPS):
        x = torch.randn(16, 8, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"{name}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def results():
    """One 2-process job trains every optimizer in turn (process start-up dominates the cost)."""
    with tempfile.TemporaryDirectory() as out_dir:
        run_ranks(_worker, out_dir)
        yield {name: [torch.load(os.path.join(out_dir, f"{name}-rank{r}.pt")) for r in (0, 1)]
               for name in OPTIMIZERS}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_replicas_stay_bit_identical(results, name):
    rank0, rank1 = results[name]
    torch.manual_seed(0)
    init = [p.detach() for p in torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                                     torch.nn.Linear(16, 3)).parameters()]
    for a, b, p0 in zip(rank0, rank1, init):
        assert torch.equal(a, b)
        assert not torch.equal(a, p0)  # it trained
