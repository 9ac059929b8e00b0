"""optimfx under DeepSpeed ZeRO (stages 1–3) with real gloo process groups (2 ranks, CPU).

DeepSpeed builds the optimizer on the model's parameters, then rewrites each param group's
``"params"`` with a flat fp32 partition of their concatenation. A pointwise optimizer (AdaX) is
unaffected: the run must equal a single-process one on the full batch. AdaFactor cannot factor a flat
partition: it must say so, and it falls back to an unfactored statistic.

DeepSpeed is imported in the forked rank processes only: its import sets up an accelerator and
logging that the rest of the test session does not need.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from _dist_harness import collect_ranks

import optimfx

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (it is in the test extra on Linux)")

STEPS = 4
BATCH = 8  # per rank
CASES = {  # name: (ZeRO stage, bf16, optimizer class, keyword arguments)
    "adax-zero2": (2, False, optimfx.AdaX, {"lr": 1e-2}),
    "adafactor-zero1": (1, False, optimfx.AdaFactor, {}),
    "adafactor-zero2": (2, False, optimfx.AdaFactor, {}),
    "adafactor-zero3": (3, False, optimfx.AdaFactor, {}),
    # stage 0 in bf16: DeepSpeed's fp32 master copy of each parameter, shapes kept
    "adafactor-bf16-zero0": (0, True, optimfx.AdaFactor, {}),
}
FLAT = ("adafactor-zero1", "adafactor-zero2", "adafactor-zero3")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))


def _batch(t: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + t)
    x, y = torch.randn(2 * BATCH, 6, generator=gen), torch.randn(2 * BATCH, 1, generator=gen)
    if rank is None:
        return x, y
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def _worker(rank: int) -> dict:
    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the harness's process group
    results = {}
    for name, (stage, bf16, cls, kwargs) in CASES.items():
        model = _model()
        opt = cls(model.parameters(), **kwargs)
        config = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            for t in range(STEPS):
                x, y = _batch(t, rank)
                if bf16:
                    x, y = x.bfloat16(), y.bfloat16()
                engine.backward(torch.nn.functional.mse_loss(engine(x), y))
                engine.step()
        if stage == 3:  # parameters are partitioned between steps: gather them to read them
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                params = [p.detach().clone() for p in model.parameters()]
        else:
            params = [p.detach().float().clone() for p in model.parameters()]
        results[name] = {
            "params": params,
            "warnings": [str(w.message) for w in caught if "not among the parameters given" in str(w.message)],
            "state_keys": sorted({k for s in opt.state.values() for k in s}),
            "state_shapes": [(tuple(p.shape), sorted(s)) for p, s in opt.state.items()],
        }
        engine.destroy()
    return results


@pytest.fixture(scope="module")
def results():
    return collect_ranks(_worker)


def _single_process(cls, kwargs) -> list[torch.Tensor]:
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    for t in range(STEPS):
        x, y = _batch(t, None)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


# DeepSpeed averages the two half-batch gradients where the single process takes one full-batch mean:
# a few fp32 roundings per step on O(1e-2) updates of O(1) weights (the bound of test_fsdp2.py)
RTOL, ATOL = 2**7 * torch.finfo(torch.float32).eps, 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_replicas_identical_and_trained(results, name):
    init = list(_model().parameters())
    for a, b, p0 in zip(results[0][name]["params"], results[1][name]["params"], init):
        assert torch.equal(a, b)
        assert not torch.equal(a, p0.detach())


def test_pointwise_optimizer_matches_single_process(results):
    assert results[0]["adax-zero2"]["warnings"] == []
    for got, want in zip(results[0]["adax-zero2"]["params"], _single_process(optimfx.AdaX, {"lr": 1e-2})):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", FLAT)
def test_adafactor_warns_that_a_flat_partition_is_not_factored(results, name):
    for rank in (0, 1):
        got = results[rank][name]
        assert len(got["warnings"]) == 1, got["warnings"]
        assert "cannot factor such a partition" in got["warnings"][0]
        assert "exp_avg_sq" in got["state_keys"] and "exp_avg_sq_row" not in got["state_keys"]


def test_adafactor_on_per_parameter_master_copies_factors_and_does_not_warn(results):
    """bf16 at stage 0: the optimizer steps fp32 copies of each parameter (new tensors, shapes kept):
    the matrices are factored and nothing is said, though the biases are 1-D tensors it was not given."""
    for rank in (0, 1):
        got = results[rank]["adafactor-bf16-zero0"]
        assert got["warnings"] == []
        shapes = dict(got["state_shapes"])
        assert "exp_avg_sq_row" in shapes[(7, 6)] and "exp_avg_sq_row" in shapes[(1, 7)]
        assert "exp_avg_sq" in shapes[(7,)]
