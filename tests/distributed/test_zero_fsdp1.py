"""``ZeroRedundancyOptimizer`` and FSDP1 flat parameters with real gloo process groups (2 ranks, CPU).

ZeRO-1 (``torch.distributed.optim.ZeroRedundancyOptimizer``) gives each rank whole parameters, so any
optimfx optimizer works unchanged: parameters must equal a single-process run on the full batch and
be identical on both ranks (ChildTuning-F once the model's parameters are numbered for its masks).
FSDP1 (``FullyShardedDataParallel``) gives 1-D flat shards, which AdaFactor cannot factor: it must
say so.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from _dist_harness import collect_ranks
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.optim import ZeroRedundancyOptimizer

import optimfx

STEPS = 4
BATCH = 8  # per rank
ZERO = {
    "adafactor": (optimfx.AdaFactor, {"beta1": 0.9}),
    "adax": (optimfx.AdaX, {"lr": 1e-2}),
    "childtuning-adamw-f": (optimfx.ChildTuningAdamW, {"lr": 1e-2, "mode": "ChildTuning-F", "reserve_p": 0.5}),
    "adafactor-f": (optimfx.AdaFactor, {"child_tuning_mode": "F", "reserve_p": 0.5, "seed": 3}),
}
# F-mode masks are keyed by a parameter's number; each rank's partition optimizer holds only some of
# the parameters, so the model's numbering is set first (optimfx.set_mask_streams)
NUMBERED = ("childtuning-adamw-f", "adafactor-f")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _train(model, opt, rank=None) -> None:
    for t in range(STEPS):
        gen = torch.Generator().manual_seed(50 + t)
        x, y = torch.randn(2 * BATCH, 6, generator=gen), torch.randn(2 * BATCH, 1, generator=gen)
        if rank is not None:
            x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _fsdp1_run() -> str | None:
    """AdaFactor on an FSDP1 model end to end; the error text when torch refuses to build one."""
    try:
        model = FullyShardedDataParallel(_model(), use_orig_params=False)
    except RuntimeError as e:
        return str(e)
    with pytest.warns(UserWarning, match="cannot factor"):
        opt = optimfx.AdaFactor(model.parameters())
    _train(model, opt, dist.get_rank())
    assert not any("exp_avg_sq_row" in s for s in opt.state.values())
    return None


def _worker(rank: int) -> dict:
    results = {}
    for name, (cls, kwargs) in ZERO.items():
        model = torch.nn.parallel.DistributedDataParallel(_model())
        if name in NUMBERED:
            optimfx.set_mask_streams(model.parameters())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
        _train(model, opt, rank)
        results[name] = [p.detach().clone() for p in model.parameters()]
        results[f"{name}-owned"] = len(opt.optim.param_groups[0]["params"])
    results["fsdp1-error"] = _fsdp1_run()
    return results


@pytest.fixture(scope="module")
def results():
    return collect_ranks(_worker)


# DDP averages two half-batch gradients where the replay takes one full-batch mean: a few fp32
# roundings per step on O(1e-2) updates of O(1) weights (same bound as test_fsdp2.py)
RTOL, ATOL = 2**7 * torch.finfo(torch.float32).eps, 1e-6


@pytest.mark.parametrize("name", list(ZERO))
def test_zero_redundancy_replicas_identical(results, name):
    assert results[0][f"{name}-owned"] > 0 and results[1][f"{name}-owned"] > 0  # both ranks own params
    init = list(_model().parameters())
    for a, b, p0 in zip(results[0][name], results[1][name], init):
        assert torch.equal(a, b)
        assert not torch.equal(a, p0.detach())  # it trained


@pytest.mark.parametrize("name", list(ZERO))
def test_zero_redundancy_matches_single_process(results, name):
    cls, kwargs = ZERO[name]
    model = _model()
    _train(model, cls(model.parameters(), **kwargs))
    for a, p in zip(results[0][name], model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP1 on GPUs needs NCCL and one device per rank")
@pytest.mark.xfail(strict=True, reason="torch 2.13 FullyShardedDataParallel refuses CPU-only machines: "
                   "'FSDP needs a non-CPU accelerator device, but no accelerator device is detected' "
                   "(fsdp/_init_utils.py _init_device_handle)")
def test_adafactor_on_fsdp1_end_to_end(results):
    for rank in (0, 1):
        assert results[rank]["fsdp1-error"] is None, results[rank]["fsdp1-error"]


def _flat_parameter() -> torch.Tensor:
    """What FSDP1 hands the optimizer with use_orig_params=False: a 1-D ``FlatParameter`` shard."""
    from torch.distributed.fsdp._flat_param import FlatParameter

    return FlatParameter(torch.randn(12), requires_grad=True)


def _orig_param_view() -> torch.Tensor:
    """What it hands with use_orig_params=True: original parameters marked as flattened, whose data
    FSDP1 sets to 1-D slices of the shard (``FlatParamHandle._use_sharded_views``)."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    p = torch.nn.Parameter(torch.randn(5))
    _set_fsdp_flattened(p)
    return p


@pytest.mark.parametrize("make", [_flat_parameter, _orig_param_view])
def test_adafactor_warns_once_on_fsdp1_flat_parameters(make):
    params = [make(), make()]
    with pytest.warns(UserWarning) as caught:
        opt = optimfx.AdaFactor(params)
    messages = [str(w.message) for w in caught if "AdaFactor" in str(w.message)]
    assert len(messages) == 1  # one warning for the optimizer, not one per parameter
    assert "cannot factor" in messages[0] and "fully_shard" in messages[0] and "use_orig_params" in messages[0]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all("exp_avg_sq" in s and "exp_avg_sq_row" not in s for s in opt.state.values())


def test_no_warning_for_ordinary_parameters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimfx.AdaFactor(_model().parameters())


def _replaced_by_a_flat_partition(opt: torch.optim.Optimizer) -> torch.Tensor:
    """What DeepSpeed ZeRO does to an optimizer it wraps (``tests/distributed/test_deepspeed_zero.py``
    runs the real thing): each group's parameters become one flat fp32 tensor, a plain tensor."""
    group = opt.param_groups[0]
    flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).requires_grad_()
    group["params"] = [flat]
    flat.grad = torch.randn_like(flat)
    return flat


def test_adafactor_warns_once_on_param_groups_rewritten_with_a_flat_partition():
    opt = optimfx.AdaFactor(_model().parameters())
    _replaced_by_a_flat_partition(opt)
    with pytest.warns(UserWarning, match="not among the parameters given") as caught:
        opt.step()
        opt.step()
    assert len([w for w in caught if "AdaFactor" in str(w.message)]) == 1
    assert "DeepSpeed ZeRO" in str(caught[0].message) and "cannot factor such a partition" in str(caught[0].message)


def test_no_warning_for_parameters_given_by_any_route():
    """The constructor, ``add_param_group``, a deep copy and a pickle round trip never warn, also for
    a group of 1-D tensors only (the shape of a flat partition); nor do per-parameter copies that keep
    their shapes (DeepSpeed's bf16 master weights, ``test_deepspeed_zero.py``), 1-D ones included."""
    model = _model()
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = optimfx.AdaFactor(weights)
    opt.add_param_group({"params": biases})  # a group with no matrix, given the proper way
    copied = copy.deepcopy(opt)
    unpickled = pickle.loads(pickle.dumps(opt))
    copies = optimfx.AdaFactor(_model().parameters())
    copies.param_groups[0]["params"] = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for o in (opt, copied, unpickled, copies):
            for group in o.param_groups:
                for p in group["params"]:
                    p.grad = torch.randn_like(p)
            o.step()
    assert all("exp_avg_sq_row" in copies.state[p] for p in copies.param_groups[0]["params"] if p.dim() == 2)


def test_the_given_record_survives_a_copy_taken_before_the_first_step():
    """A deep copy rebuilds the record from its groups: rewriting the copy's groups afterwards still
    warns, and the 1-D-only group it was given does not."""
    model = _model()
    opt = optimfx.AdaFactor([p for p in model.parameters() if p.dim() == 2])
    opt.add_param_group({"params": [p for p in model.parameters() if p.dim() == 1]})
    copied = copy.deepcopy(opt)
    _replaced_by_a_flat_partition(copied)
    for p in copied.param_groups[1]["params"]:
        p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="not among the parameters given"):
        copied.step()
