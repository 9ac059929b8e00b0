"""EGStepSize's Triton kernels vs its reference backend (TRITON_INTERPRET=1 on CPU, compiled on CUDA).

Tolerances (kernel vs reference on the same inputs, 3 steps):
* fp32: the kernel sums the alignment terms per tile in fp32 where the reference uses ``dot`` and
  ``_foreach_norm`` (and float64 for shared scopes), and its exp may differ by an ulp; the scale and the
  gains carry these relative errors of a few 1e-7 into an update of unit scale, so parameters and
  state agree to rtol=1e-5 / atol=1e-6 (two decades above the differences observed, ~2e-6 abs).
* bf16 parameters: both paths compute in fp32 and round once; a result within fp32 noise of a rounding
  boundary may round the other way, so parameters agree to one bf16 ulp (rtol = 2^-7); fp32 state to
  the fp32 tolerance, scaled by that one-ulp difference feeding back through d: rtol = 2^-7 too.
"""

from __future__ import annotations

import pytest
import torch
from _device import KERNEL_DEVICE

pytest.importorskip("triton")

import optimfx  # noqa: E402
from optimfx._kernels import _launcher  # noqa: E402
from optimfx._kernels import eg as eg_kernels  # noqa: E402

TILE = eg_kernels.BR * eg_kernels.BC
# odd sizes: a matrix, one tile ± 1 (two tiles, a partial one), a 0-d tensor and an empty tensor
SHAPES = [(7, 5), (TILE + 1,), (TILE - 1,), (), (0,)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}
STATE = ("scale", "gains", "velocity", "avg_grad")


def _init(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(KERNEL_DEVICE) for s in shapes]


def _run(backend, init, grads, base=None, **kwargs):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    make = base or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    opt = optimfx.EGStepSize(make(params), backend=backend, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _assert_matches(shapes, dtype=torch.float32, steps=3, **kwargs):
    init = _init(shapes, dtype)
    grads = [_init(shapes, dtype, seed=1 + t) for t in range(steps)]
    ref_params, ref_opt = _run("reference", init, grads, **kwargs)
    ker_params, ker_opt = _run("triton", init, grads, **kwargs)
    for pr, pk in zip(ref_params, ker_params):
        torch.testing.assert_close(pk, pr, **TOL[dtype])
        for key in STATE:
            assert ker_opt.state[pk][key].dtype == torch.float32
            torch.testing.assert_close(ker_opt.state[pk][key], ref_opt.state[pr][key], **TOL[dtype], msg=key)
    return ker_opt, ker_params


CASES = {
    "tensor-normalised": dict(scope="tensor", gamma_scale=0.5, gamma_gain=0.3),
    "group-raw": dict(scope="group", normalize=False, gamma_scale=2.0, gamma_gain=5.0),
    "global-normalised-momentum": dict(scope="global", momentum=0.9, lr=0.5, gamma_scale=0.5, gamma_gain=0.3),
    # clamps that bind: |exponent| clipped to 0.08 (two live steps reach e^±0.16), gains to [0.9, 1.1]
    "clamps-bind": dict(normalize=False, gamma_scale=50.0, gamma_gain=50.0, exp_clip=0.08, gain_clamp=(0.9, 1.1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(case):
    opt, params = _assert_matches(SHAPES, **CASES[case])
    if case == "clamps-bind":
        gains = torch.cat([opt.state[p]["gains"].flatten() for p in params]).cpu()
        assert gains.min() == pytest.approx(0.9) and gains.max() == pytest.approx(1.1)


def test_bf16_params_and_two_groups_in_one_global_unit():
    init = _init([(33,), (TILE + 3,)], torch.bfloat16)
    grads = [_init([(33,), (TILE + 3,)], torch.bfloat16, seed=1 + t) for t in range(3)]
    groups = lambda ps: torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.05}], lr=0.1)  # noqa: E731
    out = {b: _run(b, init, grads, base=groups, scope="global", gamma_scale=0.5) for b in ("reference", "triton")}
    (ref_params, ref_opt), (ker_params, ker_opt) = out["reference"], out["triton"]
    for pr, pk in zip(ref_params, ker_params):
        assert pk.dtype == torch.bfloat16
        torch.testing.assert_close(pk, pr, **TOL[torch.bfloat16])
        torch.testing.assert_close(ker_opt.state[pk]["scale"], ref_opt.state[pr]["scale"], **TOL[torch.float32])
    assert len({float(ker_opt.state[p]["scale"]) for p in ker_params}) == 1


def test_a_global_scope_sums_every_groups_rows_on_both_backends():
    """With groups of mixed scopes, a "global" group's exponent sums the rows of every group (the
    kernels' scope rows run over all tensors; the reference's ``scope_exponents`` does the same)."""
    init = _init([(33,), (TILE + 3,), (7, 5)], torch.float32)
    grads = [_init([(33,), (TILE + 3,), (7, 5)], torch.float32, seed=1 + t) for t in range(3)]
    out = {}
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        base = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
        opt = optimfx.EGStepSize(base, gamma_scale=0.5, scope="global", backend=backend)
        opt.param_groups[1]["scope"] = "tensor"
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        out[backend] = (params, opt)
    (ref_params, ref_opt), (ker_params, ker_opt) = out["reference"], out["triton"]
    for pr, pk in zip(ref_params, ker_params):
        torch.testing.assert_close(pk, pr, **TOL[torch.float32])
        torch.testing.assert_close(ker_opt.state[pk]["scale"], ref_opt.state[pr]["scale"], **TOL[torch.float32])


def test_many_tensors_one_launch_per_pass(monkeypatch):
    shapes = [(n,) for n in range(1, 17)]
    launches = []
    real = _launcher._enqueue
    monkeypatch.setattr(_launcher, "_enqueue", lambda k, *a, **kw: (launches.append(k.fn.__name__), real(k, *a, **kw)))
    opt, _ = _assert_matches(shapes, steps=2, scope="group", gamma_scale=0.5)
    # per step: the non-finite check, reduce, partials, scale and apply: one launch each for 16 tensors
    per_step = [name for name in launches if name.startswith("eg_")]
    assert per_step.count("eg_apply_kernel") == 2 and per_step.count("eg_reduce_kernel") == 2


def test_two_runs_are_bit_identical():
    init = _init(SHAPES, torch.float32)
    grads = [_init(SHAPES, torch.float32, seed=1 + t) for t in range(2)]
    a, opt_a = _run("triton", init, grads, scope="global", gamma_scale=0.5)
    b, opt_b = _run("triton", init, grads, scope="global", gamma_scale=0.5)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        assert all(torch.equal(opt_a.state[pa][k], opt_b.state[pb][k]) for k in STATE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_meta_step_is_the_base_bit_for_bit(dtype):
    init = _init(SHAPES, dtype)
    grads = [_init(SHAPES, dtype, seed=1 + t) for t in range(2)]
    base = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    plain = [torch.nn.Parameter(p.clone()) for p in init]
    opt = base(plain)
    for gs in grads:
        for p, g in zip(plain, gs):
            p.grad = g.clone()
        opt.step()
    wrapped, _ = _run("triton", init, grads, base=base, gamma_scale=0.0, gamma_gain=0.0)
    for a, b in zip(plain, wrapped):
        assert torch.equal(a, b)


def _assert_nan_step_changes_nothing(params, opt, shapes, seed):
    """One step with a NaN in the gradients: parameters and EG state exactly as before."""
    before = [p.detach().clone() for p in params]
    state = {k: [opt.state[p][k].clone() for p in params] for k in STATE}
    bad = _init(shapes, torch.float32, seed=seed)
    bad[1][3] = float("nan")
    for p, g in zip(params, bad):
        p.grad = g
    opt.step()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), before[i])
        assert all(torch.equal(opt.state[p][k], state[k][i]) for k in STATE)


def test_nonfinite_gradient_restores_params_and_keeps_eg_state():
    shapes = [(TILE + 1,), (9,)]
    params, opt = _run("triton", _init(shapes, torch.float32), [_init(shapes, torch.float32, seed=1)],
                       gamma_scale=0.5)
    _assert_nan_step_changes_nothing(params, opt, shapes, seed=2)


def test_a_plain_sgd_base_saves_no_copy_and_a_skipped_step_changes_nothing():
    """Around a plain SGD the base does not step: no parameter-sized copy of θ is kept, and a step
    skipped for a NaN gradient leaves θ and EG's state as they were (nothing to restore)."""
    init = _init([(TILE + 1,), (9,)], torch.float32)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = optimfx.EGStepSize(torch.optim.SGD(params, lr=0.1), gamma_scale=0.5, backend="triton")
    for seed in (1, 2):
        for p, g in zip(params, _init([(TILE + 1,), (9,)], torch.float32, seed=seed)):
            p.grad = g
        opt.step()
    assert not any(key[0] == "eg.saved" for key in opt._scratch if isinstance(key, tuple))
    _assert_nan_step_changes_nothing(params, opt, [(TILE + 1,), (9,)], seed=3)


def test_backend_is_validated_and_resolved():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"^Invalid backend: 'compiled'"):
        optimfx.EGStepSize(torch.optim.SGD([p], lr=0.1), backend="compiled")
    opt = optimfx.EGStepSize(torch.optim.SGD([p], lr=0.1, foreach=False))
    assert opt.param_groups[0]["eg_backend"] == "auto"
    assert optimfx.resolve_backend("auto", [p]) == "reference"  # CPU tensors


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_alignment_of_large_norms_is_not_lost_to_overflow(backend):
    """‖ν‖²·‖g‖² of gradients of 1e10 over 64 elements (~1e42) overflows fp32; the cosine is formed
    from ‖ν‖·‖g‖ (a product of square roots), so repeating one gradient still aligns (scale grows)."""
    p = torch.nn.Parameter(torch.zeros(64, device=KERNEL_DEVICE))
    opt = optimfx.EGStepSize(torch.optim.SGD([p], lr=0.1), backend=backend)
    g = torch.full((64,), 1e10, device=KERNEL_DEVICE)
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    # cos = 1: s = exp(γ_s) after the second step (γ_s = 1e-2)
    torch.testing.assert_close(opt.state[p]["scale"].cpu(), torch.tensor(1e-2).exp(), rtol=1e-6, atol=0)
