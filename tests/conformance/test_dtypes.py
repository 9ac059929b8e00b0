"""Parameter dtypes: low-precision parameters stay finite and match the reference; state follows the
precision policy (fp32 state, fp64 for fp64 parameters)."""

from __future__ import annotations

import pytest
import torch

from _harness import SHAPES, assert_runs_close, make_grads, make_params, require, run
from optim_db import rows_x_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
STATE_DTYPE = {torch.float64: torch.float64}  # every other parameter dtype gets fp32 state


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_params_stay_finite_and_state_follows_the_policy(row, backend, dtype, device):
    require(backend, device)
    params = make_params(SHAPES, device, dtype)
    grads = make_grads(params, 5)
    opt = row.make(params, backend)
    if backend == "triton" and dtype == torch.float64:
        params[0].grad = grads[0][0]
        with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
            opt.step()
        return
    initial = params[0].detach().clone()
    run(opt, params, grads)
    assert not torch.equal(params[0].detach(), initial)  # (a 0-d bf16 update may round away)
    for p in params:
        assert p.dtype == dtype and p.isfinite().all()
        for key, value in opt.state[p].items():
            if key != "step" and value.is_floating_point():
                assert value.dtype == STATE_DTYPE.get(dtype, torch.float32), key
                assert value.isfinite().all(), key
    if backend != "reference":
        ref_params = make_params(SHAPES, device, dtype)
        ref_opt = row.make(ref_params)
        run(ref_opt, ref_params, grads)
        assert_runs_close(opt, params, ref_opt, ref_params, row.tolerance)



@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row, backend", rows_x_backends(("reference",)))
def test_a_gradient_of_another_dtype_steps_as_its_parameters(row, backend, grad_dtype, device):
    """torch lets a gradient's dtype differ from its parameter's (``p.grad_dtype = None``): the step
    reads it in the parameter's compute dtype, so it equals the step on the gradient cast first.

    Within a few fp32 ulps, not bitwise: ATen's fused CPU Adam kernel (AdamW, AdaX) takes fp32
    gradients only, so the other dtypes take the per-tensor step (``tests/reference/test_aten_fused.py``
    bounds the two paths' difference)."""
    require(backend, device)
    grads = [[None if g is None else g.to(grad_dtype) for g in gs]
             for gs in make_grads(make_params(SHAPES, device, torch.float32), 3)]
    params, cast = make_params(SHAPES, device, torch.float32), make_params(SHAPES, device, torch.float32)
    for p in params:
        p.grad_dtype = None
    run(row.make(params, backend), params, grads)
    run(row.make(cast, backend), cast, [[None if g is None else g.float() for g in gs] for gs in grads])
    for p, q in zip(params, cast):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
