"""AdaX reference vs the float64 worked examples of spec/algorithms.md §2.6.

Tolerance: the spec prints 10 significant digits, so rtol=1e-9 on float64 checks every printed digit.
"""

from __future__ import annotations

import math

import pytest
import torch

from optimfx.reference import adax as ref

W0 = [[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]]
G1 = [[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]]
G2 = [[-0.05, 0.1, 0.2], [0.02, 0.03, -0.04]]
SPEC_RTOL = 1e-9
SPEC_ATOL = 1e-12


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _hyper(**kw):
    base = dict(beta1=0.9, beta2=1e-4, eps=1e-12, eps_mode="official", weight_decay=5e-2,
                decoupled=True, maximize=False)
    base.update(kw)
    return ref.AdaXHyper(**base)


def _run(hp, lr, grads=(G1, G2)):
    p, m, v = _t(W0), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        ref.step_(p, _t(g), {"exp_avg": m, "exp_avg_sq": v}, hp, ref.host_scalars(t, hp), lr)
        out.append((p.clone(), m.clone(), v.clone()))
    return out


def _close(actual, expected):
    torch.testing.assert_close(actual, _t(expected), rtol=SPEC_RTOL, atol=SPEC_ATOL)


def test_adaxw_official_two_steps():
    (w1, m1, v1), (w2, m2, v2) = _run(_hyper(), 5e-3)
    _close(m1, [[0.01, -0.02, 0.03], [0.005, 0, -0.01]])
    _close(v1, [[0.01, 0.04, 0.09], [0.0025, 0, 0.01]])
    _close(w1, [[0.499375, -0.299425, 0.19945], [0.099475, 0.3999, -0.59935]])
    _close(m2, [[0.004, -0.008, 0.047], [0.0065, 0.003, -0.013]])
    _close(v2, [[0.006250187491, 0.02500074996, 0.06500124994],
                [0.001450052497, 0.0004499775011, 0.00580020999]])
    _close(w2, [[0.4989971778, -0.2990971653, 0.1984784005],
                [0.09859665489, 0.3990929005, -0.5983466861]])


@pytest.mark.parametrize("mode, expected", [
    ("official", [[0.499366553, -0.2993419628, 0.1988034999], [0.09948463634, 0.3996368424, -0.5990075258]]),
    ("adam", [[0.499005287, -0.2991012422, 0.1984836624], [0.09862829582, 0.3991247348, -0.5983626966]]),
    ("inside", [[0.4990385341, -0.2991082115, 0.1984881641], [0.09887094265, 0.3994061026, -0.5984351968]]),
])
def test_eps_modes_with_large_eps(mode, expected):
    _, (w2, _, _) = _run(_hyper(eps=1e-3, eps_mode=mode), 5e-3)
    _close(w2, expected)


def test_adax_coupled_l2():
    (w1, _, _), (w2, _, _) = _run(_hyper(weight_decay=5e-4, decoupled=False), 1.5e-3)
    _close(w1, [[0.49985, -0.29985, 0.19985], [0.09985, 0.3998500001, -0.59985]])
    _close(w2, [[0.4997732825, -0.2997738591, 0.1995734735],
                [0.09959389216, 0.399636603, -0.5995937626]])


def test_first_step_weight_is_one():
    # spec §2.1: c_1 = b2, so w_1 = 1 and v̂_1 = g² whatever v̂ held
    sc = ref.host_scalars(1, _hyper())
    assert sc.weight == pytest.approx(1.0, rel=1e-15)
    assert sc.eps_eff == pytest.approx(1e-12 / math.sqrt(1e-4), rel=1e-12)


@pytest.mark.parametrize("mode", ["official", "adam", "inside"])
@pytest.mark.parametrize("decoupled", [True, False])
def test_stable_form_equals_raw_official_recursion(mode, decoupled):
    """The stored v̂ = v_raw / c_t with weight w_t reproduces the raw recursion (spec: ≤ 2.2e-16).

    Only ``official`` ε placement has a raw counterpart, so the other modes run with ε = 0, where
    all three placements coincide; 30 random steps in float64, compared at 1e-12 relative.
    """
    gen = torch.Generator().manual_seed(0)
    eps = 1e-12 if mode == "official" else 0.0
    hp = _hyper(eps=eps, eps_mode=mode, decoupled=decoupled, weight_decay=1e-2)
    raw_hp = _hyper(eps=eps, eps_mode="official", decoupled=decoupled, weight_decay=1e-2)
    p_stable = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    p_raw = p_stable.clone()
    m_s, v_s = torch.zeros_like(p_stable), torch.zeros_like(p_stable)
    m_r, v_r = torch.zeros_like(p_stable), torch.zeros_like(p_stable)
    for t in range(1, 31):
        g = torch.randn(7, 5, generator=gen, dtype=torch.float64)
        ref.step_(p_stable, g, {"exp_avg": m_s, "exp_avg_sq": v_s}, hp, ref.host_scalars(t, hp), 1e-2)
        ref.raw_step_(p_raw, g, m_r, v_r, t, raw_hp, 1e-2)
        c_t = (1 + 1e-4) ** t - 1
        torch.testing.assert_close(v_s, v_r / c_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(p_stable, p_raw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("step", [10**5, 887_273, 7_098_183, 10**7, 10**8])
def test_host_scalars_finite_at_huge_step_counts(step):
    """Past 7.1 M steps (b2=1e-4) expm1 overflows float64; the log form keeps w_t and ε_eff finite."""
    sc = ref.host_scalars(step, _hyper())
    assert math.isfinite(sc.weight) and 0.0 <= sc.weight < 1e-3
    assert math.isfinite(sc.eps_eff) and sc.eps_eff >= 0.0
    if step <= 10**6:
        # still the exact value b2 / ((1+b2)^t − 1) where float64 can compute it directly
        assert sc.weight == pytest.approx(1e-4 / math.expm1(step * math.log1p(1e-4)), rel=1e-10)
