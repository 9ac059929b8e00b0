"""Which parameters a step touches and how: None/zero/non-finite grads, odd shapes, complex, p.grad."""

from __future__ import annotations

import warnings

import pytest
import torch

import optimfx
from optimfx._kernels import cpu_eg

from _harness import (assert_runs_close, assert_runs_equal, clone_params, make_grads, make_params, require,
                      run, state_entries, steps_taken)
from optim_db import rows_x_backends, rows_x_inputs


def _snapshot(opt, params):
    return [(p.detach().clone(), {k: v.clone() for k, v in entry.items()})
            for p, entry in zip(params, state_entries(opt, params))]


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_params_without_grad_are_skipped(row, backend, device):
    require(backend, device)
    params = make_params([(6, 4), (5,), ()], device)
    opt = row.make(params, backend)
    before = [p.detach().clone() for p in params]
    assert opt.step() is None
    assert len(opt.state) == 0
    grads = make_grads(params, 3)
    run(opt, params, [[g[0], None, g[2]] for g in grads])
    assert params[1] not in opt.state
    assert torch.equal(params[1].detach(), before[1])
    assert not torch.equal(params[0].detach(), before[0])
    assert not torch.equal(params[2].detach(), before[2])


NOOP_CASES = {
    "zero grads, no weight decay": (dict(weight_decay=0.0), "zeros"),
    "zero grads, lr 0 (DCP state init)": (dict(lr=0.0), "zeros"),
    "random grads, lr 0": (dict(lr=0.0), "randn"),
}


@pytest.mark.parametrize("case", list(NOOP_CASES))
@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_steps_that_must_not_move_params(row, backend, case, device):
    require(backend, device)
    kwargs, kind = NOOP_CASES[case]
    params = make_params([(6, 4), (5,), ()], device)
    before = [p.detach().clone() for p in params]
    grads = make_grads(params, 3)
    if kind == "zeros":
        grads = [[torch.zeros_like(g) for g in gs] for gs in grads]
    opt = row.make(params, backend, **kwargs)
    run(opt, params, grads)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        assert all(v.isfinite().all() for v in opt.state[p].values())


def _odd_params(device):
    """0-d, 1-D, empty and non-contiguous leaves."""
    odd = [torch.randn(()), torch.randn(7), torch.randn(0), torch.randn(0, 3), torch.randn(5, 3).t()]
    return [t.to(device).requires_grad_() for t in odd]


def _has_group_step(opt) -> bool:
    """Whether the reference backend may step some tensors together (``Algorithm.group_step``): ATen's
    fused kernel takes the contiguous copy, the per-tensor step the non-contiguous original, so the
    two agree to rounding, not bit for bit. EG is asked about its base, and steps fp32 contiguous CPU
    groups in its own C kernels (``optimfx._kernels.cpu_eg``) where they are built."""
    if isinstance(opt, optimfx.EGStepSize) and cpu_eg.available():
        # the contiguous copies may take the C kernels (fp32 CPU), the originals the reference
        return all(p.dtype == torch.float32 and p.device.type == "cpu"
                   for group in opt.param_groups for p in group["params"])
    algorithm = getattr(getattr(opt, "base", opt), "algorithm", None)
    return algorithm is not None and algorithm.group_step is not None


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_odd_shapes_match_the_reference_on_contiguous_copies(row, backend, device):
    require(backend, device)
    params = _odd_params(device)
    assert not params[-1].is_contiguous()
    layout = [(p.data_ptr(), p.stride()) for p in params]
    ref_params = [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for p in params]
    grads = make_grads(params, 4)
    opt = row.make(params, backend)
    ref_opt = row.make(ref_params)
    run(opt, params, grads)
    run(ref_opt, ref_params, grads)
    assert [(p.data_ptr(), p.stride()) for p in params] == layout  # updated in place
    if backend == "reference" and not _has_group_step(opt):
        assert_runs_equal(opt, params, ref_opt, ref_params)
    else:
        assert_runs_close(opt, params, ref_opt, ref_params, row.tolerance)
    assert steps_taken(row, opt, params) in (None, [4] * len(params))


@pytest.mark.parametrize("row, backend, inp", rows_x_inputs())
def test_grad_is_never_modified(row, backend, inp, device):
    require(backend, device)
    params = _odd_params(device) + make_params([(6, 4)], device)
    opt = row.make(params, backend, **inp.kwargs)
    for gs in make_grads(params, 2):
        saved = [g.clone() for g in gs]
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        for p, g, g0 in zip(params, gs, saved):
            assert p.grad is g and torch.equal(g, g0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_nonfinite_grad_skips_the_step(row, backend, bad, device):
    """Every backend leaves everything, ``step`` included, as it was. Triton skips on the device;
    its step counters are settled from the flag without a sync: at once on CPU tensors, at the next
    ``step()`` or ``state_dict()`` on CUDA (called here before reading the state)."""
    require(backend, device)
    params = make_params([(6, 4), (5,), ()], device)
    twin = clone_params(params)
    grads = make_grads(params, 4)
    opt, opt_twin = row.make(params, backend), row.make(twin, backend)
    run(opt, params, grads[:2])
    before = _snapshot(opt, params)
    poisoned = [g.clone() for g in grads[2]]
    poisoned[1][2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run(opt, params, [poisoned])
    for p, (value, state), entry in zip(params, before, state_entries(opt, params)):
        assert torch.equal(p.detach(), value)
        assert entry.keys() == state.keys()
        for key, saved in state.items():
            assert torch.equal(entry[key], saved), key
    run(opt, params, grads[2:])
    assert all(p.isfinite().all() for p in params)
    # the skipped step left no trace: same as never seeing it
    run(opt_twin, twin, grads)
    assert_runs_equal(opt, params, opt_twin, twin)


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_complex_param_equals_its_real_view(row, backend, device):
    require(backend, device)
    cplx = [torch.randn(4, 3, dtype=torch.complex64, device=device).requires_grad_()]
    real = [torch.view_as_real(cplx[0].detach()).clone().requires_grad_()]
    opt = row.make(cplx, backend, weight_decay=1e-2)
    if not row.supports_complex:
        cplx[0].grad = torch.randn_like(cplx[0])
        with pytest.raises(RuntimeError, match="complex"):
            opt.step()
        return
    opt_real = row.make(real, backend, weight_decay=1e-2)
    grads = make_grads(real, 3)
    run(opt_real, real, grads)
    run(opt, cplx, [[torch.view_as_complex(g)] for [g] in grads])
    assert torch.equal(torch.view_as_real(cplx[0].detach()), real[0].detach())
    for key, value in opt_real.state[real[0]].items():
        assert torch.equal(opt.state[cplx[0]][key], value), key
