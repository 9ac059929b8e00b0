"""ChildTuning under FSDP2 (2 gloo ranks, CPU): the Triton kernels' F masks and the ``ChildTuning`` adapter.

Both must mask a sharded run exactly as a single process masks the whole tensor: an F mask keyed by
the element's global index (local index + the shard's element offset), a D mask sliced like the
parameter. The model, batches and sharding are ``test_fsdp2.py``'s (uneven, square, 3-D and empty
shards); one forked 2-rank job trains every case and the parent replays each in one process on the
full batch. F masks drop half the gradient entries, so a mask drawn from local indices moves the
parameters by O(lr) away from the replay, far outside the fp32 tolerance.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from _dist_harness import run_ranks
from test_fsdp2 import ATOL, BATCH, RTOL, STEPS, _batch, _d_masks, _full, _make_model, _sharded, _train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import optimfx
from optimfx._dispatch import triton_available


def _adapter_d(ps, model, base=torch.optim.AdamW):
    opt = optimfx.ChildTuning(base(ps, lr=1e-2), "D")
    opt.set_gradient_mask(_d_masks(model))
    return opt


# name -> factory(params, model, backend); the Triton runs are replayed on the reference backend
# (same F masks bit for bit: tests/kernels/test_child_tuning_masks.py)
OPTIMIZERS = {
    "childtuning-adamw-f-triton": lambda ps, m, b: optimfx.ChildTuningAdamW(ps, lr=1e-2, mode="ChildTuning-F",
                                                                            reserve_p=0.5, seed=3, backend=b),
    "adamw-f-triton": lambda ps, m, b: optimfx.AdamW(ps, lr=1e-2, weight_decay=0.1, child_tuning_mode="F",
                                                     reserve_p=0.5, seed=5, backend=b),
    "adaxw-f-triton": lambda ps, m, b: optimfx.AdaXW(ps, lr=1e-2, child_tuning_mode="F", reserve_p=0.5, seed=7,
                                                     backend=b),
    "adapter-f": lambda ps, m, b: optimfx.ChildTuning(torch.optim.AdamW(ps, lr=1e-2), "F", reserve_p=0.5, seed=2),
    "adapter-d": lambda ps, m, b: _adapter_d(ps, m),
    # around an optimfx optimizer the adapter hands it its options and masks (no masking of its own)
    "adapter-delegating-f": lambda ps, m, b: optimfx.ChildTuning(optimfx.AdaXW(ps, lr=1e-2), "F", 0.5, seed=4),
    "adapter-delegating-d": lambda ps, m, b: _adapter_d(ps, m, optimfx.AdamW),
}
DELEGATING = ("adapter-delegating-f", "adapter-delegating-d")
TRITON = {n for n in OPTIMIZERS if n.endswith("-triton")}
ADAPTERS = ("adapter-f", "adapter-d")
if not triton_available():
    OPTIMIZERS = {n: f for n, f in OPTIMIZERS.items() if n not in TRITON}


COLUMN_SHARDED = {
    "column-sharded-adamw-f": lambda ps: optimfx.AdamW(ps, lr=1e-2, child_tuning_mode="F", reserve_p=0.5,
                                                       backend="reference"),
    "column-sharded-adapter-f": lambda ps: optimfx.ChildTuning(torch.optim.AdamW(ps, lr=1e-2), "F", 0.5),
}


def _column_sharded(mesh):
    """The test model with the matrices whose columns split evenly sharded along them (``Shard(1)``:
    ``inp.weight``, 5 × 8; FSDP2 refuses uneven shards on other axes than the first)."""
    from torch.distributed.fsdp import fully_shard

    model = _make_model()
    world = mesh.size()
    placement = lambda p: Shard(1) if p.ndim > 1 and p.shape[1] % world == 0 else None  # noqa: E731
    for sub in (model.inp, model.mid, model.head):
        fully_shard(sub, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


def _make(name, model):
    return OPTIMIZERS[name](list(model.parameters()), model, "triton" if name in TRITON else "reference")


def _user_grads_kept(model, opt, rank) -> bool:
    """One more step: every ``p.grad`` is the same object with the same values afterwards."""
    x, y = _batch(STEPS)
    half = slice(rank * BATCH, (rank + 1) * BATCH)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
    before = [(p.grad, p.grad.to_local().clone()) for p in model.parameters()]
    opt.step()
    return all(p.grad is g and torch.equal(g.to_local(), v) for p, (g, v) in zip(model.parameters(), before))


def _worker(rank: int, out_dir: str) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for name in OPTIMIZERS:
        model = _sharded(mesh)
        try:
            opt = _make(name, model)
            _train(model, opt, STEPS, rank)
            results[name] = {"params": _full(model), "error": None}
            if name in ADAPTERS:
                mask = opt.state[model.inp.weight].get("child_mask")
                results[name]["mask_placement"] = str(mask.placements) if isinstance(mask, DTensor) else None
                results[name]["grads_kept"] = _user_grads_kept(model, opt, rank)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    # F masks are keyed by global element index: a shard along another axis than the first is refused
    for name, make in COLUMN_SHARDED.items():
        model = _column_sharded(mesh)
        try:
            _train(model, make(list(model.parameters())), 1, rank)
            results[name] = {"error": None}
        except NotImplementedError as e:
            results[name] = {"error": str(e)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {n: r.get("grads_kept") for n, r in results.items()})
    if rank == 0:
        for name in ADAPTERS:
            results[name]["grads_kept"] = [g[name] for g in gathered]
        torch.save(results, os.path.join(out_dir, "results.pt"))


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as out_dir:
        run_ranks(_worker, out_dir)
        yield torch.load(os.path.join(out_dir, "results.pt"), weights_only=False)


def _single(name: str):
    model = _make_model()
    _train(model, OPTIMIZERS[name](list(model.parameters()), model, "reference"), STEPS)
    return model


@pytest.mark.parametrize("name", [n if n in OPTIMIZERS else pytest.param(n, marks=pytest.mark.skip("no Triton"))
                                  for n in sorted(TRITON) + list(ADAPTERS) + list(DELEGATING)])
def test_fsdp2_child_tuning_matches_single_process(results, name):
    got = results[name]
    assert got["error"] is None, got["error"]
    model = _single(name)
    init = dict(_make_model().named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["params"][n], p.detach(), rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
        assert not torch.equal(p.detach(), init[n].detach()), f"{n} did not train"


@pytest.mark.parametrize("name", ADAPTERS)
def test_fsdp2_adapter_leaves_user_gradients_untouched(results, name):
    got = results[name]
    assert got["error"] is None, got["error"]
    assert got["grads_kept"] == [True, True]


def test_fsdp2_adapter_d_mask_is_placed_like_the_parameter(results):
    """A global-shape D mask becomes a DTensor sharded like its parameter (DCP saves and reshards it)."""
    got = results["adapter-d"]
    assert got["error"] is None, got["error"]
    assert got["mask_placement"] == str((Shard(0),))


@pytest.mark.parametrize("name", list(COLUMN_SHARDED))
def test_f_masks_of_a_shard_along_another_axis_are_refused(results, name):
    """Its elements are not one run of the global indices, so it cannot draw the single-process mask:
    a clear error instead of masks that silently differ from a single process's."""
    assert "sharded along axis [1]" in (results[name]["error"] or "")
