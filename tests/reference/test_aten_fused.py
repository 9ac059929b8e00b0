"""AdaX/AdaXW and AdamW through ATen's fused Adam kernel (``optimfx/reference/aten_fused.py``) equal
the per-tensor reference step, and the tensors and options the kernel cannot take fall back to it.

Tolerances: the kernel evaluates the same formula in fp32 with its own association (one expression
per element, the bias corrections folded into ``lr`` and ``ε``), so each step's parameter update
differs by a rounding or two. Observed after 20 steps: parameters within 0.7 fp32 ulp of the
largest parameter, moments within 2e-7 relative. Allowed: ``atol = 2^3·eps·max|θ|`` on parameters
and ``rtol = 2^4·eps`` (1.9e-6) plus ``atol = 2^4·eps`` on the moments (``m`` may nearly cancel),
while a wrong scalar map (a missed bias correction, ``ε`` on the wrong side) is off by percents.
Masked groups take the C kernel of ``optimfx._kernels.cpu_adam`` where it is built (the same formula,
its own roundings) and are held to the same bounds: observed after 20 steps, parameters within 0.66
ulp of the largest parameter, moments within 3.3e-7 relative where they do not nearly cancel.
"""

from __future__ import annotations

import math

import pytest
import torch

import optimfx
from optimfx.reference import adax, aten_fused

pytestmark = pytest.mark.skipif(not aten_fused.available(), reason="this torch has no fused Adam ops")

EPS = torch.finfo(torch.float32).eps
SHAPES = [(), (7,), (0, 3), (16, 24), (3, 5, 7), (130, 7)]
STEPS = 20

ADAX_CONFIGS = {
    "adax": dict(cls=optimfx.AdaX),
    "adax-l2-maximize": dict(cls=optimfx.AdaX, weight_decay=0.1, maximize=True),
    "adaxw-decay": dict(cls=optimfx.AdaXW, weight_decay=0.1),
    "adaxw-adam-eps": dict(cls=optimfx.AdaXW, eps=1e-3, eps_mode="adam", betas=(0.0, 1e-3)),
    "adaxw-child-tuning-F": dict(cls=optimfx.AdaXW, weight_decay=0.1, child_tuning_mode="F", reserve_p=0.5),
    "adax-child-tuning-D": dict(cls=optimfx.AdaX, weight_decay=0.1, child_tuning_mode="D"),
}
ADAMW_CONFIGS = {
    "adamw": dict(cls=optimfx.AdamW),
    "adamw-no-bias-correction": dict(cls=optimfx.AdamW, correct_bias=False, maximize=True),
    "adamw-eps-on-v": dict(cls=optimfx.AdamW, eps_placement="v", eps=1e-3, weight_decay=0.3),
    "adamw-lr-0": dict(cls=optimfx.AdamW, lr=0.0, weight_decay=0.3),
    # the official defaults: decay after the step, but no decay
    "ChildTuningAdamW-F": dict(cls=optimfx.ChildTuningAdamW, mode="ChildTuning-F", reserve_p=0.5),
}


def _make(config: dict, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(config)
    cls = kwargs.pop("cls")
    kwargs.setdefault("lr", 1e-2)
    return cls(params, **kwargs)


def _params(shapes=SHAPES, dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]



def _per_tensor(monkeypatch) -> None:
    """Switch the fused path off, as on a torch without the fused ops."""
    monkeypatch.setattr(aten_fused, "available", lambda: False)


def _run(config: dict, shapes=SHAPES, dtype=torch.float32, steps: int = STEPS) -> list[torch.nn.Parameter]:
    params = _params(shapes, dtype)
    opt = _make(config, params)
    if config.get("child_tuning_mode") == "D":
        gen = torch.Generator().manual_seed(2)
        opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < 0.5 for p in params})
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params, opt


def _assert_close_runs(fused, reference) -> None:
    (ps, opt), (qs, ref_opt) = fused, reference
    for p, q in zip(ps, qs):
        scale = float(q.detach().abs().max()) if q.numel() else 1.0
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0.0, atol=2**3 * EPS * scale)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=2**4 * EPS, atol=2**4 * EPS)


@pytest.mark.parametrize("name", list(ADAX_CONFIGS) + list(ADAMW_CONFIGS))
def test_fused_step_equals_the_per_tensor_reference(name, monkeypatch, kernel_calls, masked_path):
    config = {**ADAX_CONFIGS, **ADAMW_CONFIGS}[name]
    fused = _run(config)
    # one call per step for the whole group (masked ones too: it fits one batch), the empty tensor left out
    assert kernel_calls == [len(SHAPES) - 1] * STEPS
    kernel_calls.clear()
    with monkeypatch.context() as m:
        _per_tensor(m)
        reference = _run(config)
    assert kernel_calls == []
    _assert_close_runs(fused, reference)


@pytest.mark.parametrize("config", [
    dict(cls=optimfx.AdaXW, eps_mode="inside"),
    dict(cls=optimfx.AdamW, weight_decay=0.1, decay_order="alicemind"),
    dict(cls=optimfx.ChildTuningAdamW, mode="ChildTuning-F", reserve_p=0.5, weight_decay=0.01),
], ids=["eps-inside", "decay-after-step", "ChildTuningAdamW-decay"])
def test_options_the_kernel_does_not_compute_take_the_per_tensor_step(config, kernel_calls):
    params, _ = _run(config, steps=3)
    assert kernel_calls == []
    assert all(p.isfinite().all() for p in params)


@pytest.mark.parametrize("cls", [optimfx.AdaX, optimfx.AdaXW])
def test_a_group_with_beta1_one_takes_the_per_tensor_step(cls, kernel_calls):
    """Groups are checked when added, but a group's values can be rewritten later (a momentum
    schedule writes ``group["betas"]``): with ``b1 = 1`` the kernel would divide by its bias
    correction ``1 − 1^t = 0``; the reference keeps ``m = 0`` and the parameters where they are."""
    p = torch.nn.Parameter(torch.randn(8))
    before = p.detach().clone()
    opt = cls([p], lr=1e-2, weight_decay=0.0)
    opt.param_groups[0]["betas"] = (1.0, 1e-4)
    for _ in range(2):
        p.grad = torch.randn(8)
        opt.step()
    assert kernel_calls == []
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("eps, fused", [(1e-44, False), (1e-30, True)])
def test_an_eps_the_kernel_would_flush_to_zero_takes_the_per_tensor_step(eps, fused, kernel_calls):
    """AdamW hands the kernel ``ε/c2`` (smaller than ``ε``), rounded to fp32: below the smallest
    normal it may become 0, and a coordinate with ``m = v = 0`` would compute ``0/0``."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = optimfx.AdamW([p], lr=1e-2, eps=eps, weight_decay=0.0)
    p.grad = torch.tensor([0.0] * 4 + [1.0] * 4)
    opt.step()
    assert (kernel_calls == [1]) == fused
    assert torch.equal(p.detach()[:4], torch.ones(4)) and p.isfinite().all()


def test_non_contiguous_and_bf16_tensors_fall_back(kernel_calls):
    fast = torch.nn.Parameter(torch.randn(6, 5))
    transposed = torch.nn.Parameter(torch.randn(5, 6).t())
    low = torch.nn.Parameter(torch.randn(6, 5).bfloat16())
    opt = optimfx.AdaXW([fast, transposed, low], lr=1e-2)
    for p in (fast, transposed, low):
        p.grad = torch.ones_like(p)
    opt.step()
    assert kernel_calls == [1]  # only the contiguous fp32 tensor


def _adax_step_with_weight(lo: float, hi: float) -> int:
    """The first step count whose AdaX weight ``w_t`` (default betas) lies in ``[lo, hi)``."""
    hp = adax.AdaXHyper(0.9, 1e-4, 1e-12, "official", 0.0, True, False)
    lo_t, hi_t = 1, 10**7
    while lo_t < hi_t:  # w_t decreases with t
        mid = (lo_t + hi_t) // 2
        if adax.host_scalars(mid, hp).weight >= hi:
            lo_t = mid + 1
        else:
            hi_t = mid
    assert lo <= adax.host_scalars(lo_t, hp).weight < hi
    return lo_t


@pytest.mark.parametrize("weight_range, fused", [((2.0**-26, 2.0**-25), True), ((2.0**-40, 2.0**-26), False)])
def test_long_runs_keep_the_new_gradients_weight(weight_range, fused, kernel_calls):
    """Late in a run AdaX's weight ``w_t`` is tiny; the kernel recovers it as ``1 − (1 − w_t)`` in
    float64, exact to fp32 down to ``2^-26`` (then the reference step takes over). A gradient
    spike (``w·g²`` comparable to ``v̂``) shows a coefficient that is off."""
    step = _adax_step_with_weight(*weight_range)
    hp = adax.AdaXHyper(0.9, 1e-4, 1e-12, "official", 0.0, True, False)
    sc = adax.host_scalars(step, hp)
    spike = math.sqrt(1.0 / sc.weight)  # w·g² = 1 = v̂

    def state():
        return {"exp_avg": torch.full((64,), 0.5), "exp_avg_sq": torch.ones(64)}

    p = torch.randn(64)
    q = p.clone()
    g = torch.full((64,), spike)
    fused_state, ref_state = state(), state()
    left = aten_fused.step_group(adax.fused_adam_arguments, [p], [g], [fused_state], [step], hp, 1e-3,
                                 lambda t: adax.host_scalars(t, hp))
    assert (kernel_calls == [1]) == fused and left == ([] if fused else [0])
    adax.step_(q, g, ref_state, hp, sc, 1e-3)
    if fused:
        torch.testing.assert_close(fused_state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=2**4 * EPS, atol=0.0)
        torch.testing.assert_close(p, q, rtol=2**4 * EPS, atol=0.0)


def test_gradients_are_only_read(kernel_calls):
    params = _params()
    grads = [torch.randn(p.shape) for p in params]
    saved = [g.clone() for g in grads]
    opt = optimfx.AdamW(params, lr=1e-2, weight_decay=0.1, maximize=True)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert kernel_calls
    assert all(p.grad is g and torch.equal(g, s) for p, g, s in zip(params, grads, saved))


def test_the_weight_floor_is_needed(monkeypatch):
    """Below the floor the kernel's recovered weight is visibly off (here ~1e-4 relative in ``v̂``):
    with the floor removed, the comparison of the test above fails."""
    monkeypatch.setattr(adax, "FUSED_MIN_WEIGHT", 0.0)
    step = _adax_step_with_weight(2.0**-44, 2.0**-40)
    hp = adax.AdaXHyper(0.9, 1e-4, 1e-12, "official", 0.0, True, False)
    sc = adax.host_scalars(step, hp)
    g = torch.full((64,), math.sqrt(1.0 / sc.weight))
    fused_state = {"exp_avg": torch.zeros(64), "exp_avg_sq": torch.ones(64)}
    ref_state = {k: v.clone() for k, v in fused_state.items()}
    assert aten_fused.step_group(adax.fused_adam_arguments, [torch.zeros(64)], [g], [fused_state], [step], hp,
                                 1e-3, lambda t: adax.host_scalars(t, hp)) == []
    adax.step_(torch.zeros(64), g, ref_state, hp, sc, 1e-3)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(fused_state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=2**4 * EPS, atol=0.0)
