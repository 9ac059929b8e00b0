"""EGStepSize around real base optimizers: identities, scopes, robustness and checkpoints."""

from __future__ import annotations

import copy

import os

import pytest
import torch

import optimfx
from _lockstep import assert_resumes_in_lockstep

W0 = [[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]]
GS = [[[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]], [[-0.05, 0.1, 0.2], [0.02, 0.03, -0.04]],
      [[0.04, -0.05, 0.1], [0.01, 0.02, -0.03]]]

BASES = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "torch-adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "optimfx-adaxw": lambda ps: optimfx.AdaXW(ps, lr=1e-2),
    "optimfx-adafactor": lambda ps: optimfx.AdaFactor(ps),
    "optimfx-adamw-ct": lambda ps: optimfx.AdamW(ps, child_tuning_mode="F", reserve_p=0.5, seed=3),
}


def _problem(seed=0, steps=6):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen), torch.randn(3, 2, 2, generator=gen)]
    grads = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(steps)]
    return init, grads


def _run(make, init, grads):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def test_funnel_class_matches_spec_normalised_example():
    p = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = optimfx.Funnel([p], lr=0.1, momentum=0.9, beta=0.9, gamma_scale=0.1, gamma_gain=0.1,
                         exp_clip=None, gain_clamp=(None, None))
    for g in GS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = [[0.4768640401, -0.2556371432, 0.02594339191], [0.08032466016, 0.3914710726, -0.5591426876]]
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert opt.scale_stats()[0]["scale_mean"] == pytest.approx(1.14515564, rel=1e-9)


@pytest.mark.parametrize("base", list(BASES))
def test_zero_meta_step_is_the_base_bit_for_bit(base):
    init, grads = _problem()
    plain, _ = _run(BASES[base], init, grads)
    wrapped, _ = _run(lambda ps: optimfx.EGStepSize(BASES[base](ps), gamma_scale=0.0, gamma_gain=0.0), init, grads)
    for a, b in zip(plain, wrapped):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scope", ["group", "global"])
def test_shared_scopes_share_one_scale(scope):
    init, grads = _problem()
    _, opt = _run(lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.05), momentum=0.9, gamma_scale=0.5,
                                                 scope=scope), init, grads)
    scales = {float(s["scale"]) for s in opt.state.values()}
    assert len(scales) == 1 and scales != {1.0}


def test_global_scope_does_not_depend_on_parameter_order():
    init, grads = _problem()
    make = lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.05), momentum=0.9,  # noqa: E731
                                         gamma_scale=0.5, gamma_gain=0.1, scope="global")
    forward, _ = _run(make, init, grads)
    backward, _ = _run(make, init[::-1], [g[::-1] for g in grads])
    for a, b in zip(forward, backward[::-1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # fp32 sums in another order


def test_scale_and_gains_stay_positive_and_finite_under_huge_meta_steps():
    init, grads = _problem(steps=20)
    _, opt = _run(lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.05), gamma_scale=1e6, gamma_gain=1e6,
                                                 normalize=False, exp_clip=5.0, gain_clamp=(1e-3, 1e3)),
                  init, grads)
    for state in opt.state.values():
        assert float(state["scale"]) > 0 and torch.isfinite(state["scale"])
        assert (state["gains"] >= 1e-3).all() and (state["gains"] <= 1e3).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("base", ["torch-adam", "optimfx-adaxw"])
def test_nonfinite_gradient_skips_base_and_eg(base, backend):
    """A torch base would step on inf gradients and poison its moments; on every backend EG skips
    the whole step (the Triton path reads its device flag before a base that does not skip itself),
    and the next finite step is finite."""
    if backend == "triton":
        pytest.importorskip("triton")
    init, grads = _problem(steps=3)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = optimfx.EGStepSize(BASES[base](params), gamma_scale=0.5, backend=backend)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    bad = [g.clone() for g in grads[1]]
    bad[1][0] = float("inf")
    for p, g in zip(params, bad):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    after = opt.state_dict()
    for key, state in snapshot["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(value))
    for p, g in zip(params, grads[2]):
        p.grad = g.clone()
    opt.step()
    assert all(p.isfinite().all() for p in params)
    assert not all(torch.equal(p.detach(), v) for p, v in zip(params, values))


@pytest.mark.parametrize("eg_checks", [True, False], ids=["eg-checks", "eg-does-not-check"])
def test_an_optimfx_base_does_not_check_the_gradients_eg_checked(eg_checks, monkeypatch):
    """EG's reference path checks the gradients before the base steps; an optimfx base then skips
    its own full read of them (and checks them itself when EG does not)."""
    from optimfx import _dispatch

    calls = []
    original = _dispatch.all_finite
    monkeypatch.setattr(_dispatch, "all_finite", lambda grads: calls.append(len(grads)) or original(grads))
    init, grads = _problem(steps=2)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    base = optimfx.AdaXW(params, lr=1e-2)
    opt = optimfx.EGStepSize(base, backend="reference", skip_nonfinite=eg_checks)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    assert calls == ([] if eg_checks else [3, 3])
    assert not base._known_finite  # the flag is the wrapper's step only
    with pytest.raises(KeyError), base.gradients_known_finite():
        raise KeyError  # and it is reset when the step raises
    assert not base._known_finite
    params[0].grad = torch.full_like(params[0], float("nan"))
    # outside EG the base checks again
    with pytest.warns(RuntimeWarning, match="skipped"):
        base.step()


def test_state_dict_round_trip_continues_in_lockstep():
    init, grads = _problem(steps=8)
    make = lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-2), gamma_scale=0.3, gamma_gain=0.1)  # noqa: E731
    ref_params, ref_opt = _run(make, init, grads[:4])
    assert_resumes_in_lockstep(make, ref_params, ref_opt, copy.deepcopy(ref_opt.state_dict()), grads[4:])


def test_state_dict_holds_the_base_state_per_parameter():
    """One entry per parameter, EG's keys and the base's as ``base/<key>``: the layout DCP maps to names."""
    init, grads = _problem(steps=2)
    _, opt = _run(lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-2), gamma_scale=0.3), init, grads)
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups"}
    base = opt.base.state_dict()["state"]
    for i, entry in saved["state"].items():
        assert set(entry) == {"scale", "gains", "velocity", "avg_grad"} | {f"base/{k}" for k in base[i]}
        assert all(torch.equal(entry[f"base/{k}"], v) for k, v in base[i].items())


def test_checkpoint_with_the_base_state_under_base_loads():
    """The layout written before the base's state moved into the entries: ``{"state", "param_groups",
    "base": base.state_dict()}``."""
    init, grads = _problem(steps=6)
    make = lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-2), gamma_scale=0.3, gamma_gain=0.1)  # noqa: E731
    ref_params, ref_opt = _run(make, init, grads[:3])
    current = copy.deepcopy(ref_opt.state_dict())
    old = {"state": {i: {k: v for k, v in e.items() if not k.startswith("base/")} for i, e in current["state"].items()},
           "param_groups": current["param_groups"], "base": copy.deepcopy(ref_opt.base.state_dict())}
    assert_resumes_in_lockstep(make, ref_params, ref_opt, old, grads[3:])


def test_scheduler_on_the_wrapper_drives_the_base_lr():
    p = torch.nn.Parameter(torch.ones(3))
    base = torch.optim.SGD([p], lr=0.1)
    opt = optimfx.EGStepSize(base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_errors():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError):
        optimfx.EGStepSize([p])
    with pytest.raises(ValueError, match="scope"):
        optimfx.EGStepSize(torch.optim.SGD([p], lr=0.1), scope="layer")
    with pytest.raises(ValueError, match="gamma_scale"):
        optimfx.EGStepSize(torch.optim.SGD([p], lr=0.1), gamma_scale=-1.0)
    # Funnel's lr is SGD's, checked as every optimfx lr is (SGD alone would let nan through)
    for lr in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^Invalid lr: "):
            optimfx.Funnel([p], lr=lr)


def test_grads_are_read_only_and_the_saved_buffer_is_reused():
    init, grads = _problem(steps=3)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = optimfx.EGStepSize(torch.optim.Adam(params, lr=1e-2), gamma_scale=0.3, backend="reference")
    addresses = None
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, gs):
            assert torch.equal(p.grad, g)
        now = sorted(b.data_ptr() for b in opt._scratch.values())
        assert addresses in (None, now) and len(now) == len(params)  # one buffer per parameter, kept
        addresses = now


def test_complex_param_equals_its_real_view():
    cplx = torch.randn(4, 3, dtype=torch.complex64).requires_grad_()
    real = torch.view_as_real(cplx.detach()).clone().requires_grad_()
    make = lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.1), momentum=0.5, gamma_scale=0.3)  # noqa: E731
    opt_c, opt_r = make([cplx]), make([real])
    for _ in range(3):
        g = torch.randn(4, 3, 2)
        real.grad, cplx.grad = g.clone(), torch.view_as_complex(g.clone())
        opt_r.step()
        opt_c.step()
    # torch's SGD itself rounds a complex step and the step of its real view differently (~1 ulp),
    # so only the EG part is exact: equal up to a few fp32 ulps of unit-scale values
    torch.testing.assert_close(torch.view_as_real(cplx.detach()), real.detach(), rtol=1e-6, atol=1e-7)
    assert opt_c.state[cplx]["gains"].shape == real.shape


def test_deepcopy_keeps_the_base_and_continues_identically():
    init, grads = _problem(steps=4)
    params, opt = _run(lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-2), gamma_scale=0.3), init, grads[:2])
    params2, opt2 = copy.deepcopy((params, opt))
    assert isinstance(opt2.base, torch.optim.Adam) and opt2.base.param_groups is opt2.param_groups
    for ps, o in ((params, opt), (params2, opt2)):
        for gs in grads[2:]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_backend_errors():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"^Invalid backend: 'cuda'"):
        optimfx.EGStepSize(torch.optim.SGD([p], lr=0.1), backend="cuda")


@pytest.mark.parametrize("make_base", [
    lambda ps, maximize: torch.optim.SGD(ps, lr=0.05, momentum=0.5, maximize=maximize),
    lambda ps, maximize: optimfx.AdaXW(ps, lr=1e-2, maximize=maximize),
], ids=["sgd", "adaxw"])
def test_maximize_base_adapts_like_minimising_the_negated_loss(make_base):
    """EG around a maximising base on ``−f`` takes the steps EG around the plain base takes on ``f``
    (the alignments see the descent gradient, so the scale grows when the steps are too short)."""
    torch.manual_seed(0)
    target = torch.randn(6, 4)
    start = torch.randn(6, 4)
    runs = []
    for maximize in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = optimfx.EGStepSize(make_base([p], maximize), gamma_scale=0.1, gamma_gain=0.05)
        for _ in range(8):
            opt.zero_grad()
            loss = (p - target).square().sum()
            (-loss if maximize else loss).backward()
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["scale"].clone()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert runs[0][1] != 1.0  # the scale moved, so the check compares adaptation, not a no-op


@pytest.mark.parametrize("make", [lambda **kw: optimfx.EGStepSize(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))],
                                                                                   lr=0.1), **kw),
                                  lambda **kw: optimfx.Funnel([torch.nn.Parameter(torch.zeros(2))], **kw)],
                         ids=["eg", "funnel"])
def test_raw_exponents_need_both_meta_step_sizes(make):
    """Raw dot products scale with 1/gradient²: no default γ fits every model, so both are required;
    the normalised (cosine) form keeps 1e-2 for each."""
    with pytest.raises(ValueError, match=r"^Invalid gamma_scale: None \(normalize=False"):
        make(normalize=False)
    with pytest.raises(ValueError, match=r"^Invalid gamma_gain: None"):
        make(normalize=False, gamma_scale=0.1)
    opt = make(normalize=False, gamma_scale=0.1, gamma_gain=0.2)
    assert (opt.defaults["gamma_scale"], opt.defaults["gamma_gain"]) == (0.1, 0.2)
    assert (make().defaults["gamma_scale"], make().defaults["gamma_gain"]) == (1e-2, 1e-2)



@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_funnel_keeps_steps_below_the_parameters_float_spacing(backend):
    """Funnel's base step ``lr·g`` is formed directly, not read back as ``θ_{t-1} − θ_t``: a step of
    4e-8 on weights in [1, 1.5) (fp32 spacing 1.2e-7) would round away, and Funnel would never move.
    With γ = 0 it is SGD with momentum, so it moves as ``torch.optim.SGD`` does (to fp32 rounding of
    the accumulated velocity: rtol 5 %, the spacing over the ~7e-5 moved)."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    init = torch.linspace(1.0, 1.5, 64)
    grad = torch.full((64,), 4e-7)
    funnel_p, sgd_p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    funnel = optimfx.Funnel([funnel_p], lr=0.1, momentum=0.9, gamma_scale=0.0, gamma_gain=0.0, backend=backend)
    sgd = torch.optim.SGD([sgd_p], lr=0.1, momentum=0.9)
    for _ in range(200):
        funnel_p.grad, sgd_p.grad = grad.clone(), grad.clone()
        funnel.step()
        sgd.step()
    moved, expected = init - funnel_p.detach(), init - sgd_p.detach()
    assert float(expected.min()) > 5e-5
    torch.testing.assert_close(moved, expected, rtol=0.05, atol=0)
    assert torch.equal(funnel_p.grad, grad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_funnel_momentum_is_the_group_key_schedulers_cycle(backend):
    """Funnel keeps μ in the groups' ``momentum`` key, where ``OneCycleLR``/``CyclicLR`` write: a
    cycled μ is EG's velocity coefficient, never a second SGD momentum on top of it. With γ = 0 and a
    constant lr, ``ν_t = lr·b_t`` for torch's buffer ``b_t = μ_t b_{t-1} + g_t`` whatever μ_t does,
    so the run equals ``torch.optim.SGD`` under the same momentum schedule (fp32 rounding: rtol 1e-5)."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(5, 3, generator=gen)
    funnel_p, sgd_p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    funnel = optimfx.Funnel([funnel_p], lr=0.05, momentum=0.9, gamma_scale=0.0, gamma_gain=0.0, backend=backend)
    sgd = torch.optim.SGD([sgd_p], lr=0.05, momentum=0.9)
    assert funnel.param_groups[0]["momentum"] == 0.9
    for step in range(12):
        mu = 0.85 + 0.1 * abs(((step % 6) / 3.0) - 1.0)  # a triangular cycle as CyclicLR's
        funnel.param_groups[0]["momentum"] = sgd.param_groups[0]["momentum"] = mu
        g = torch.randn(5, 3, generator=gen)
        funnel_p.grad, sgd_p.grad = g.clone(), g.clone()
        funnel.step()
        sgd.step()
    torch.testing.assert_close(funnel_p.detach(), sgd_p.detach(), rtol=1e-5, atol=1e-6)
    assert not funnel.base.state, "the SGD base must not step (it would apply μ a second time)"


def test_funnel_runs_under_one_cycle_with_momentum_cycling():
    p = torch.nn.Parameter(torch.randn(4))
    opt = optimfx.Funnel([p], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5)
    seen = []
    for _ in range(5):
        p.grad = torch.randn(4)
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["momentum"])
    assert len(set(seen)) > 1 and all(0.85 <= m <= 0.95 for m in seen)
    assert not opt.base.state


def test_base_momentum_needs_a_plain_sgd_base():
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"^Invalid momentum: 'base' takes μ from a torch.optim.SGD base"):
        optimfx.EGStepSize(optimfx.AdamW([p]), momentum="base")
    with pytest.raises(ValueError, match=r"^Invalid momentum: 1.5"):
        optimfx.Funnel([p], momentum=1.5)
    for kwargs in (dict(nesterov=True), dict(dampening=0.5)):
        with pytest.raises(ValueError, match=r"^Invalid momentum: 'base' applies .* without nesterov or dampening"):
            optimfx.EGStepSize(torch.optim.SGD([p], lr=0.1, momentum=0.9, **kwargs), momentum="base")
    # a group of its own asking for it on another base: refused, and the group not kept
    eg = optimfx.EGStepSize(optimfx.AdamW([p]))
    with pytest.raises(ValueError, match=r"^Invalid momentum: 'base' takes μ from a torch.optim.SGD base"):
        eg.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "eg_momentum": "base"})
    assert len(eg.param_groups) == len(eg.base.param_groups) == 1


def test_a_funnel_groups_own_momentum_becomes_its_sgd_momentum():
    """In Funnel a group's numeric ``eg_momentum`` (constructor groups, ``add_param_group``) is its μ,
    kept in its ``momentum`` key: the SGD base never holds a momentum beside EG's."""
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    opt = optimfx.Funnel([{"params": [a], "eg_momentum": 0.5}, {"params": [b]}], lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [c], "eg_momentum": 0.0})
    assert [(g["momentum"], g["eg_momentum"]) for g in opt.param_groups] == [(0.5, "base"), (0.9, "base"),
                                                                               (0.0, "base")]
    for p in (a, b, c):
        p.grad = torch.randn(3)
    opt.step()
    assert not opt.base.state


def test_a_funnel_checkpoint_from_before_base_momentum_resumes_exactly():
    """Funnel checkpoints written when μ lived in ``eg_momentum`` (and SGD's ``momentum`` was 0) load
    into today's Funnel and continue as the run that wrote them, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, generator=gen) for _ in range(6)]
    p_old = torch.nn.Parameter(torch.randn(5, generator=gen))
    old = optimfx.EGStepSize(torch.optim.SGD([p_old], lr=0.1), lr=1.0, momentum=0.9)
    for g in grads[:3]:
        p_old.grad = g.clone()
        old.step()
    p_new = torch.nn.Parameter(p_old.detach().clone())
    resumed = optimfx.Funnel([p_new], lr=0.1, momentum=0.9)
    resumed.load_state_dict(old.state_dict())
    # μ moves to the key schedulers cycle, so a resumed OneCycleLR cannot add an SGD momentum
    assert (resumed.param_groups[0]["momentum"], resumed.param_groups[0]["eg_momentum"]) == (0.9, "base")
    for g in grads[3:]:
        p_old.grad, p_new.grad = g.clone(), g.clone()
        old.step()
        resumed.step()
    assert torch.equal(p_old, p_new)


def test_triton_groups_on_several_devices_fall_back_under_auto(monkeypatch):
    """EG's passes launch once for all its Triton groups, on one device: groups spread over devices
    run the reference under ``"auto"`` and are refused under an explicit ``"triton"``. CPU and meta
    tensors stand in for two GPUs (the backend rule is forced to pick Triton for both)."""
    from optimfx.optim import eg as eg_module

    monkeypatch.setattr(eg_module, "resolve_backend", lambda requested, params: "triton")
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))
    a.grad, b.grad = torch.randn(3), torch.randn(3, device="meta")
    opt = optimfx.EGStepSize(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1))
    assert [u.backend for u in opt._units()] == ["reference", "reference"]
    opt.param_groups[1]["eg_backend"] = "triton"
    units = opt._units()
    with pytest.raises(RuntimeError, match=r"one device together, got \['cpu', 'meta'\]"):
        opt._kernel_device([u for u in units if u.backend == "triton"])
