"""EG step-size reference vs spec/algorithms.md §3.6 (float64; 10 printed digits → rtol=1e-9)."""

from __future__ import annotations

import torch

from optimfx.reference import eg

W0 = [[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]]
GS = [[[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]], [[-0.05, 0.1, 0.2], [0.02, 0.03, -0.04]],
      [[0.04, -0.05, 0.1], [0.01, 0.02, -0.03]]]
SPEC = dict(rtol=1e-9, atol=1e-12)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _funnel(normalize, gamma):
    hp = eg.EGHyper(lr=0.1, momentum=0.9, beta=0.9, gamma_scale=gamma, gamma_gain=gamma, normalize=normalize,
                    exp_clip=None, gain_min=None, gain_max=None)
    p = _t(W0)
    state = {"scale": torch.ones((), dtype=torch.float64), "gains": torch.ones(2, 3, dtype=torch.float64),
             "velocity": torch.zeros(2, 3, dtype=torch.float64), "avg_grad": torch.zeros(2, 3, dtype=torch.float64)}
    out = []
    for g in map(_t, GS):
        exponent = eg.scale_exponent(*eg.scale_exponent_parts(state["velocity"], g), hp)
        p.sub_(g)  # the base's proposal θ − d with d = g
        eg.step_(p, g, g, state, exponent, hp)
        out.append((p.clone(), {k: v.clone() for k, v in state.items()}))
    return out


def test_funnel_raw_form():
    (w1, s1), (w2, s2), (w3, s3) = _funnel(normalize=False, gamma=10.0)
    torch.testing.assert_close(w1, _t([[0.49, -0.28, 0.17], [0.095, 0.4, -0.59]]), **SPEC)
    torch.testing.assert_close(s2["scale"], _t(1.040810774), **SPEC)
    torch.testing.assert_close(s2["gains"], _t([[0.9950124792, 0.9801986733, 1.061836547],
                                                [1.0010005, 1, 1.004008011]]), **SPEC)
    torch.testing.assert_close(w2, _t([[0.4858108016, -0.2714674195, 0.1197946907],
                                       [0.08823264731, 0.3968775677, -0.5764527736]]), **SPEC)
    torch.testing.assert_close(s3["scale"], _t(1.104177509), **SPEC)
    torch.testing.assert_close(w3, _t([[0.4774092618, -0.2578873075, 0.05957019893],
                                       [0.08066521946, 0.391686608, -0.5601791596]]), **SPEC)


def test_funnel_normalised_form():
    _, (w2, s2), (w3, s3) = _funnel(normalize=True, gamma=0.1)
    torch.testing.assert_close(s2["scale"], _t(1.044478927), **SPEC)
    torch.testing.assert_close(s2["gains"], _t([[0.9678882964, 0.8776087686, 1.479439257],
                                                [1.006549071, 1, 1.026454751]]), **SPEC)
    torch.testing.assert_close(w2, _t([[0.4856543843, -0.270365818, 0.1108942064],
                                       [0.08819720624, 0.3968665632, -0.5763112482]]), **SPEC)
    torch.testing.assert_close(s3["scale"], _t(1.14515564), **SPEC)
    torch.testing.assert_close(w3, _t([[0.4768640401, -0.2556371432, 0.02594339191],
                                       [0.08032466016, 0.3914710726, -0.5591426876]]), **SPEC)


def test_aligned_gradients_grow_the_scale():
    # sign convention (§3.5.5): ⟨ν_{t-1}, g_t⟩ > 0 means the last step was too short
    hp = eg.EGHyper(0.1, 0.9, 0.9, 1.0, 1.0, True, None, None, None)
    nu, g = _t([1.0, 2.0]), _t([0.5, 1.0])
    assert eg.scale_exponent(*eg.scale_exponent_parts(nu, g), hp) > 0
    assert eg.scale_exponent(*eg.scale_exponent_parts(nu, -g), hp) < 0
    assert eg.scale_exponent(*eg.scale_exponent_parts(torch.zeros(2, dtype=torch.float64), g), hp) == 0


def test_su_simplified_rule():
    p, gains, prev = _t(W0), torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    out = []
    for g in map(_t, GS):
        eg.su_simplified_step_(p, g, gains, prev, lr=0.1, gamma=10.0)
        out.append((p.clone(), gains.clone()))
    torch.testing.assert_close(out[1][1], _t([[0.9512294245, 0.8187307531, 1.8221188],
                                              [1.010050167, 1, 1.040810774]]), **SPEC)
    torch.testing.assert_close(out[2][0], _t([[0.4910265718, -0.2842933036, 0.1113022147],
                                              [0.09196782738, 0.3949879639, -0.5826766297]]), **SPEC)
