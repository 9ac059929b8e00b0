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
from optimfx._kernels import cpu_adam, cpu_build, cpu_eg, cpu_launcher
from optimfx.optim import eg as eg_module
from optimfx.reference import aten_fused
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
    for name in ("adapt", "adam_step"):
        monkeypatch.setattr(cpu_eg, name, lambda *a, _f=getattr(cpu_eg, name), _n=name, **k:
                            calls.append((_n, len(a[0]))) or _f(*a, **k))
    fused, fused_opt = run(True)
    # the fp32 group only; from the second step on (the base's state exists) in the base's step
    assert calls == [("adapt", 3), ("adam_step", 3), ("adam_step", 3)]
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


# ---- the pass that takes an Adam-family base's step (cpu_eg.adam_step, optim/eg_adam_pass.py) ----

ADAM_SHAPES = [(1,), (63,), (64 * 9 + 5,), (cpu_eg.CHUNK + 5,)]


def _adam_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in ADAM_SHAPES]
    grads = [torch.randn(s, generator=gen) for s in ADAM_SHAPES]
    states = [{"scale": torch.tensor(1.3), "gains": torch.rand(s, generator=gen) + 0.5,
               "velocity": torch.randn(s, generator=gen) * 0.01, "avg_grad": torch.randn(s, generator=gen)}
              for s in ADAM_SHAPES]
    moments = [{"exp_avg": torch.randn(s, generator=gen) * 0.1, "exp_avg_sq": torch.rand(s, generator=gen) * 0.1}
               for s in ADAM_SHAPES]
    return params, grads, states, moments


ADAM_ARGS = {
    "adamw": aten_fused.FusedAdamArguments(True, 1e-2, 0.9, 0.999, 0.01, 1e-8, False),
    "no-decay": aten_fused.FusedAdamArguments(True, 3e-3, 0.8, 0.99, 0.0, 1e-6, False),
    "coupled-l2": aten_fused.FusedAdamArguments(False, 1e-2, 0.9, 0.9, 0.1, 1e-8, False),
}


@pytest.mark.parametrize("args", list(ADAM_ARGS.values()), ids=list(ADAM_ARGS))
@pytest.mark.parametrize("hp", [_hyper(), _hyper(momentum=0.9, lr=0.5, exp_clip=None, gain_min=None, gain_max=None)],
                         ids=["fresh-velocity", "momentum-unclipped"])
def test_adam_pass_is_bitwise_the_three_passes_around_the_c_adam_step(args, hp):
    """One pass against ``adapt``, ``cpu_adam.step`` (the same Adam arithmetic) and ``apply``: the
    same fp32 operations in the same order per element, so the same bits, on lengths around the
    kernel's 64-element spans and 16384-element chunks."""
    params, grads, states, moments = _adam_inputs(1)
    coefs = [0.7, 3.0, 0.05, 1.1]
    one = [p.clone() for p in params], _clone(states), _clone(moments)
    cpu_eg.adam_step(one[0], grads, one[1], one[2], coefs, hp, args)
    three = [p.clone() for p in params], _clone(states), _clone(moments)
    saved = [torch.empty_like(p) for p in params]
    cpu_eg.adapt(three[0], grads, three[1], saved, coefs, hp)
    cpu_adam.step(three[0], grads, [m["exp_avg"] for m in three[2]], [m["exp_avg_sq"] for m in three[2]],
                  lr=args.lr, beta1=args.beta1, beta2=args.beta2, weight_decay=args.weight_decay, eps=args.eps,
                  decoupled=args.decoupled, maximize=False)
    cpu_eg.apply(three[0], three[1], saved, hp)
    for a, b in zip(one[0], three[0]):
        assert torch.equal(a, b)
    for got, want in [(one[1], three[1]), (one[2], three[2])]:
        for x, y in zip(got, want):
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(one[0][0], params[0])  # it stepped


def _eg_run(make, steps: int, monkeypatch, taken: bool, grads_at=None, seed: int = 0, reference: bool = False):
    """``steps`` steps of ``make(params)``; with ``taken=False`` no base step is taken into EG's
    pass (the three passes around the base's own step); with ``reference`` EG runs the reference's
    ATen ops (no C kernel). Returns the parameters, the optimizer and the tensor counts of the
    ``adam_step`` calls."""
    calls: list[int] = []
    with monkeypatch.context() as m:
        m.setattr(cpu_eg, "adam_step", lambda *a, _f=cpu_eg.adam_step, **k: calls.append(len(a[0])) or _f(*a, **k))
        if not taken:
            m.setattr(eg_module, "base_takes_part", lambda *a: False)
        if reference:
            m.setattr(cpu_eg, "available", lambda: False)
        gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (3, 5, 7), (130, 70), (0, 3), ()]]
        opt = make(params)
        for t in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) + 0.5
            if grads_at is not None:
                grads_at(t, params)
            opt.step()
    return params, opt, calls


TAKEN_BASES = {
    "adamw": lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps, lr=1e-2), gamma_scale=0.3, gamma_gain=0.1),
    "adamw-maximize-momentum-global": lambda ps: optimfx.EGStepSize(
        optimfx.AdamW(ps, lr=1e-2, weight_decay=0.0, maximize=True), momentum=0.9, lr=0.5, scope="global"),
    "adax-l2-raw-group": lambda ps: optimfx.EGStepSize(optimfx.AdaX(ps, lr=1e-2, weight_decay=0.1), normalize=False,
                                                       gamma_scale=1e-2, gamma_gain=1e-2, scope="group"),
    "adamw-two-groups": lambda ps: optimfx.EGStepSize(optimfx.AdamW(
        [{"params": ps[:2], "betas": (0.8, 0.99)}, {"params": ps[2:], "lr": 3e-3}], lr=1e-2), exp_clip=None),
}


@pytest.mark.parametrize("name", list(TAKEN_BASES))
def test_eg_takes_an_adam_family_base_step_into_its_own_pass(name, monkeypatch):
    """From the second step on (the base's moments exist) the base's step runs in EG's pass, and the
    run tracks the three passes around ATen's kernel: the Adam arithmetic of the two kernels differs
    by a few ulp per step (``test_cpu_adam.py``), which EG's feedback carries on, so 1e-5 relative
    over five steps; a wrong term is off by percents."""
    taken, taken_opt, calls = _eg_run(TAKEN_BASES[name], 5, monkeypatch, taken=True)
    plain, plain_opt, plain_calls = _eg_run(TAKEN_BASES[name], 5, monkeypatch, taken=False)
    reference, reference_opt, reference_calls = _eg_run(TAKEN_BASES[name], 5, monkeypatch, taken=False,
                                                        reference=True)
    groups = len(taken_opt.param_groups)
    assert len(calls) == 4 * groups and sum(calls) == 4 * 4 and plain_calls == reference_calls == []
    # against the reference's ATen ops (the base stepped by its own reference-backend kernel) and
    # against the three C passes
    for p, q in [*zip(taken, reference), *zip(taken, plain)]:
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(taken, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ref.STATE_KEYS:
            torch.testing.assert_close(taken_opt.state[p][key], plain_opt.state[q][key], rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(taken_opt.base.state[p][key], plain_opt.base.state[q][key], rtol=1e-5,
                                       atol=1e-7)
    assert any(float(taken_opt.state[p]["scale"]) != 1.0 for p in taken if p.numel())
    # the first step's saved copies of the parameters are not kept: the pass needs none
    assert not any(p in taken_opt._scratch for p in taken) and any(p in plain_opt._scratch for p in plain)


NOT_TAKEN = {
    "child-tuning-f": lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps, lr=1e-2, child_tuning_mode="F", reserve_p=0.5)),
    "decay-after-step": lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps, lr=1e-2, decay_order="alicemind")),
    "torch-adamw": lambda ps: optimfx.EGStepSize(torch.optim.AdamW(ps, lr=1e-2)),
    "eg-steps-on-nonfinite": lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps, lr=1e-2), skip_nonfinite=False),
}


@pytest.mark.parametrize("name", list(NOT_TAKEN))
def test_base_steps_it_cannot_take_run_as_before(name, monkeypatch):
    """Masked steps, a decay the ATen map declines, a torch.optim base and an EG that leaves the
    finiteness check to the base: the base steps by itself, bit for bit as with no pass to take it."""
    taken, taken_opt, calls = _eg_run(NOT_TAKEN[name], 3, monkeypatch, taken=True)
    plain, plain_opt, _ = _eg_run(NOT_TAKEN[name], 3, monkeypatch, taken=False)
    assert calls == []
    for p, q in zip(taken, plain):
        assert torch.equal(p, q)


def test_one_group_taken_and_one_masked_in_one_step(monkeypatch):
    def make(ps):
        return optimfx.EGStepSize(optimfx.AdamW([{"params": ps[:2], "child_tuning_mode": "F", "reserve_p": 0.5},
                                                 {"params": ps[2:]}], lr=1e-2))
    taken, taken_opt, calls = _eg_run(make, 3, monkeypatch, taken=True)
    plain, _, _ = _eg_run(make, 3, monkeypatch, taken=False)
    assert calls == [2, 2]  # the unmasked group's non-empty tensors, steps 2 and 3
    for p, q in zip(taken, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_skipped_step_leaves_everything_as_it_was(monkeypatch):
    """An inf gradient at the third step: parameters, EG's state, the base's moments and step count
    unchanged by it, on the path that takes the base's steps."""
    snapshots = {}

    def poison(t, params):
        if t == 2:
            snapshots["before"] = [p.detach().clone() for p in params]
            params[2].grad[1, 1] = float("inf")

    with pytest.warns(RuntimeWarning, match="skipped"):
        params, opt, calls = _eg_run(TAKEN_BASES["adamw"], 3, monkeypatch, taken=True, grads_at=poison)
    assert len(calls) == 1  # step 2 only
    for p, before in zip(params, snapshots["before"]):
        assert torch.equal(p, before)
        assert int(opt.base.state[p]["step"]) == 2


def test_resuming_from_a_checkpoint_continues_the_same_run(monkeypatch):
    """Three steps, a state_dict round trip into a fresh optimizer and model copy, two more steps:
    bit for bit the five uninterrupted steps (the pass keeps nothing outside the state)."""
    whole, whole_opt, _ = _eg_run(TAKEN_BASES["adamw"], 5, monkeypatch, taken=True)
    gen_grads = []

    def record(t, params):
        gen_grads.append([p.grad.clone() for p in params])

    first, first_opt, _ = _eg_run(TAKEN_BASES["adamw"], 5, monkeypatch, taken=True, grads_at=record)
    # replay: 3 steps, checkpoint, fresh objects, 2 steps with the same gradients
    params, opt, _ = _eg_run(TAKEN_BASES["adamw"], 0, monkeypatch, taken=True)
    for t in range(3):
        for p, g in zip(params, gen_grads[t]):
            p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = TAKEN_BASES["adamw"](copies)
    resumed.load_state_dict(saved)
    calls = []
    monkeypatch.setattr(cpu_eg, "adam_step", lambda *a, _f=cpu_eg.adam_step, **k: calls.append(len(a[0])) or _f(*a, **k))
    for t in range(3, 5):
        for p, g in zip(copies, gen_grads[t]):
            p.grad = g.clone()
        resumed.step()
    assert calls == [4, 4]
    for p, q in zip(copies, whole):
        assert torch.equal(p, q)


def test_parameters_viewing_one_buffer_keep_the_three_passes(monkeypatch):
    """Two parameters that start at one address (views of one buffer): the pass names the base's
    tensors by address, so that group steps as before, and the result is the three passes'."""
    def run(taken: bool):
        calls = []
        with monkeypatch.context() as m:
            m.setattr(cpu_eg, "adam_step", lambda *a, _f=cpu_eg.adam_step, **k: calls.append(len(a[0])) or _f(*a, **k))
            if not taken:
                m.setattr(eg_module, "base_takes_part", lambda *a: False)
            buffer = torch.randn(64, generator=torch.Generator().manual_seed(0))
            a, b = torch.nn.Parameter(buffer[:32]), torch.nn.Parameter(buffer[:32].view(4, 8))
            opt = optimfx.EGStepSize(optimfx.AdamW([a, b], lr=1e-2))
            for t in range(3):
                a.grad, b.grad = torch.full((32,), 0.5 + t), torch.full((4, 8), -0.25)
                opt.step()
        return a.detach().clone(), calls

    (got, calls), (want, _) = run(True), run(False)
    assert calls == []
    assert torch.equal(got, want)
