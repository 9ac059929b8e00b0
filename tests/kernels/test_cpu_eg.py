"""The C kernels of EG's CPU path (``kernels/cpu_eg.c``) against the reference's ATen ops, pass by
pass on the same inputs, and the whole optimizer with and without them.

Tolerances: each pass evaluates the reference's expressions in the same order in fp32, except
``exp`` (within one ulp of the correctly rounded value here, Sleef's in ATen: together two ulp) and
ATen's FMA in ``lerp``; a gain is one product with ``exp``, so gains agree within 4 ulp
(``rtol = 4·eps``); velocities and parameters within a few ulp of the largest value. The sums are
fp32 lanes over fixed chunks added in float64 (the reference: fp32 BLAS), compared with a float64
oracle.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import optimfx
from optimfx._kernels import cpu_build, cpu_eg, cpu_launcher
from optimfx.reference import eg as ref

pytestmark = pytest.mark.skipif(not cpu_eg.available(),
                                reason=f"CPU kernels unavailable: {cpu_build.unavailable_reason('cpu_eg')}")

EPS = torch.finfo(torch.float32).eps
SHAPES = [(1,), (7, 3), (0,), (cpu_eg.CHUNK + 5,), (3 * cpu_eg.CHUNK,)]


def _hyper(**kw) -> ref.EGHyper:
    base = dict(lr=1.0, momentum=0.0, beta=0.9, gamma_scale=0.1, gamma_gain=0.1, normalize=True, exp_clip=1.0,
                gain_min=1e-3, gain_max=1e3)
    return ref.EGHyper(**{**base, **kw})


def _tensors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    states = []
    for s in SHAPES:
        states.append({"scale": torch.tensor(1.3), "gains": torch.rand(s, generator=gen) + 0.5,
                       "velocity": torch.randn(s, generator=gen) * 0.1, "avg_grad": torch.randn(s, generator=gen)})
    return params, grads, states


def _magnitude(t: torch.Tensor, floor: float = 1.0) -> float:
    return max(floor, float(t.abs().max())) if t.numel() else floor


def _clone(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "python-threads"])
def test_sums_equal_a_float64_oracle_and_do_not_depend_on_the_thread_split(openmp, monkeypatch):
    _, grads, states = _tensors()
    got = cpu_eg.alignment_parts(grads, states)
    for row, g, s in zip(got, grads, states):
        nu, m = s["velocity"].double(), s["avg_grad"].double()
        want = torch.stack([(nu * g.double()).sum(), nu.square().sum(), g.double().square().sum(), m.square().sum()])
        # 16 fp32 lanes of at most 1024 terms per chunk: ~sqrt(1024)·eps typical error (1e-5 allows
        # 2.5x that); the reference's fp32 BLAS sums run a whole tensor in fp32 lanes
        torch.testing.assert_close(row, want.float(), rtol=1e-5, atol=0.0)
    if openmp and not cpu_eg._LIB.openmp:
        pytest.skip("the kernels are built without OpenMP here")
    monkeypatch.setattr(cpu_eg._LIB, "openmp", openmp)
    monkeypatch.setattr(cpu_launcher, "MIN_ELEMENTS_PER_THREAD", 64)
    torch.set_num_threads(3)
    try:
        split = cpu_eg.alignment_parts(grads, states)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(got, split)


@pytest.mark.parametrize("hp", [_hyper(), _hyper(beta=0.2, exp_clip=None, gain_min=None, gain_max=2.0)],
                         ids=["defaults", "large-lerp-weight-no-clip"])
def test_adapt_equals_the_reference_gains_and_average(hp):
    params, grads, states = _tensors()
    ref_states = _clone(states)
    coefs = [0.7, -0.3, 0.0, 2.5, 1.1]
    saved = [torch.empty_like(p) for p in params]
    cpu_eg.adapt(params, grads, states, saved, coefs, hp)
    for g, s, c in zip(grads, ref_states, coefs):
        ref.update_gains_(s["gains"], s["avg_grad"], g, hp, c)
    ref.update_average_([s["avg_grad"] for s in ref_states], grads, hp)
    for p, b, s, r in zip(params, saved, states, ref_states):
        assert torch.equal(b, p)
        torch.testing.assert_close(s["gains"], r["gains"], rtol=4 * EPS, atol=0.0)
        torch.testing.assert_close(s["avg_grad"], r["avg_grad"], rtol=0.0, atol=EPS * 4)


@pytest.mark.parametrize("hp, sgd_decay", [(_hyper(), 0.0), (_hyper(momentum=0.9), 0.01),
                                           (_hyper(momentum=0.5, lr=0.7), 0.0)],
                         ids=["fresh-velocity", "momentum-decay", "momentum-eta"])
def test_direct_step_equals_the_reference_sgd_step(hp, sgd_decay):
    params, grads, states = _tensors()
    ref_params, ref_states = [p.clone() for p in params], _clone(states)
    coefs = [0.5] * len(params)
    cpu_eg.adapt(params, grads, states, None, coefs, hp, direct=True,
                 sgd_lr=0.05, sgd_decay=sgd_decay)
    for p, g, s, c in zip(ref_params, grads, ref_states, coefs):
        ref.update_gains_(s["gains"], s["avg_grad"], g, hp, c)
        d = ref.sgd_direction_(torch.empty_like(p), g, p, 0.05, sgd_decay)
        ref.apply_direct_(p, d, s, hp)
    ref.update_average_([s["avg_grad"] for s in ref_states], grads, hp)
    for p, q, s, r in zip(params, ref_params, states, ref_states):
        torch.testing.assert_close(p, q, rtol=0.0, atol=4 * EPS * _magnitude(q))
        # μν + η·p⊙d may nearly cancel: an ulp or two of its terms (ATen's addcmul may fuse)
        torch.testing.assert_close(s["velocity"], r["velocity"], rtol=0.0, atol=4 * EPS * _magnitude(r["velocity"], 0.0))


@pytest.mark.parametrize("hp", [_hyper(), _hyper(momentum=0.9, lr=0.5)], ids=["fresh-velocity", "momentum"])
def test_apply_equals_the_reference_apply(hp):
    params, _, states = _tensors()
    proposals = [p - 0.01 * torch.randn_like(p) for p in params]
    ref_params, ref_states = [p.clone() for p in proposals], _clone(states)
    cpu_eg.apply(proposals, states, params, hp)
    for q, saved, s in zip(ref_params, params, ref_states):
        ref.apply_(q, saved - q, s, hp)
    for p, q, s, r in zip(proposals, ref_params, states, ref_states):
        torch.testing.assert_close(p, q, rtol=0.0, atol=4 * EPS * _magnitude(q))
        torch.testing.assert_close(s["velocity"], r["velocity"], rtol=0.0, atol=4 * EPS * _magnitude(r["velocity"], 0.0))


def _kernel_exp(z: torch.Tensor, exp_clip) -> torch.Tensor:
    """``p·exp(z)`` with ``p = 1`` and ``z = 1·m·g`` (``m = 1``) reads the kernel's ``exp`` back."""
    state = {"scale": torch.tensor(1.0), "gains": torch.ones_like(z), "velocity": torch.zeros_like(z),
             "avg_grad": torch.ones_like(z)}
    hp = _hyper(exp_clip=exp_clip, gain_min=None, gain_max=None)
    cpu_eg.adapt([torch.zeros_like(z)], [z], [state], [torch.empty_like(z)], [1.0], hp)
    return state["gains"]


def _max_ulp(got: torch.Tensor, want: torch.Tensor) -> float:
    spacing = torch.from_numpy(np.spacing(got.numpy())).double()
    return float(((want - got.double()).abs() / spacing).max())


@pytest.mark.parametrize("exp_clip, low, high", [(None, -103.9, 88.7), (87.0, -87.0, 87.0), (1.0, -1.0, 1.0)],
                         ids=["unclipped", "clipped-87", "clipped-1"])
def test_exp_is_within_one_ulp(exp_clip, low, high):
    """A clipped exponent (at most 87) takes the kernel's exp without range checks."""
    z = torch.linspace(low, high, 200_001)
    got, want = _kernel_exp(z, exp_clip), z.double().exp()
    normal = want >= torch.finfo(torch.float32).tiny
    assert _max_ulp(got[normal], want[normal]) <= 1.0
    subnormal = ~normal
    torch.testing.assert_close(got[subnormal].double(), want[subnormal], rtol=0.0, atol=2.0**-149)


def test_exp_keeps_inf_nan_and_underflow():
    special = torch.tensor([0.0, -0.0, 88.73, 89.0, -104.0, -200.0, float("inf"), -float("inf"), float("nan")])
    got = _kernel_exp(special, None).tolist()
    assert got[:8] == [1.0, 1.0, math.inf, math.inf, 0.0, 0.0, math.inf, 0.0] and math.isnan(got[8])
    # a clipped exponent: NaN stays NaN, ±5 become ±1
    clipped = _kernel_exp(torch.tensor([float("nan"), 5.0, -5.0]), 1.0).tolist()
    assert math.isnan(clipped[0])
    assert math.isclose(clipped[1], math.e, rel_tol=2**-23) and math.isclose(clipped[2], 1 / math.e, rel_tol=2**-23)


def _run(make, steps: int, monkeypatch, fused: bool):
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(cpu_eg, "available", lambda: False)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (3, 5, 7), (130, 7), (0, 3), ()]]
        opt = make(params)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) + 0.5
            opt.step()
    return params, opt


BASES = {
    "adamw": lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps, lr=1e-2)),
    "torch-adam-maximize-raw": lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-2, maximize=True),
                                                             normalize=False, gamma_scale=1e-3, gamma_gain=1e-3),
    "funnel": lambda ps: optimfx.Funnel(ps, lr=0.05, momentum=0.9),
    "sgd-global": lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.05, weight_decay=0.01), scope="global"),
}


@pytest.mark.parametrize("name", list(BASES))
def test_optimizer_with_the_kernels_tracks_the_reference(name, monkeypatch):
    """Three steps: the passes differ by a few ulp (and the sums by fp32 accumulation in the
    reference), so parameters and state agree to 1e-5 relative; a wrong formula is off by percents."""
    fused, fused_opt = _run(BASES[name], 3, monkeypatch, fused=True)
    plain, plain_opt = _run(BASES[name], 3, monkeypatch, fused=False)
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ref.STATE_KEYS:
            torch.testing.assert_close(fused_opt.state[p][key], plain_opt.state[q][key], rtol=1e-5, atol=1e-6)
    assert any(float(fused_opt.state[p]["scale"]) != 1.0 for p in fused if p.numel())


def test_kernels_take_only_fp32_contiguous_cpu_tensors():
    p, g = torch.randn(4, 3), torch.randn(4, 3)
    state = ref.init_state(p)
    assert cpu_eg.takes(p, g, state)
    assert not cpu_eg.takes(p.t(), g.t(), {k: (v.t() if v.dim() else v) for k, v in state.items()})
    assert not cpu_eg.takes(p.double(), g.double(), ref.init_state(p.double()))
    assert not cpu_eg.takes(p.bfloat16(), g, ref.init_state(p.bfloat16()))


def test_one_step_mixing_kernel_and_reference_units_tracks_the_reference(monkeypatch):
    """scope='global' over an fp32 group (the C kernels) and a float64 group (the reference): the
    global sums combine both units before either moves."""
    def make(ps):
        return optimfx.EGStepSize(optimfx.AdamW([{"params": ps[:3]}, {"params": ps[3:]}], lr=1e-2), scope="global")

    def run(fused: bool):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(cpu_eg, "available", lambda: False)
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dt))
                      for s, dt in [((7,), torch.float32), ((40, 9), torch.float32), ((), torch.float32),
                                    ((5, 5), torch.float64), ((11,), torch.float64)]]
            opt = make(params)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.3
                opt.step()
        return params, opt

    calls = []
    monkeypatch.setattr(cpu_eg, "adapt", lambda *a, _f=cpu_eg.adapt, **k: calls.append(len(a[0])) or _f(*a, **k))
    fused, fused_opt = run(True)
    assert calls == [3, 3, 3]  # the fp32 group only
    plain, plain_opt = run(False)
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_opt.state[p]["scale"], plain_opt.state[q]["scale"], rtol=1e-5, atol=0.0)


def test_state_of_another_size_or_dtype_takes_the_reference():
    """A state the kernels cannot read as the parameter's twin (a checkpoint of another model) goes
    to the reference, which raises a clear error, in a subprocess (a wrong read would crash it)."""
    code = textwrap.dedent("""
        import torch, optimfx
        p = torch.nn.Parameter(torch.randn(100_000))
        opt = optimfx.EGStepSize(optimfx.AdamW([p], lr=1e-2))
        p.grad = torch.randn(100_000)
        opt.step()
        opt.state[p]["gains"] = torch.ones(10)
        p.grad = torch.randn(100_000)
        try:
            opt.step()
        except RuntimeError as exc:
            print("RuntimeError", "size" in str(exc))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RuntimeError True"
