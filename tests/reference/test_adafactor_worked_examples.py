"""AdaFactor reference vs the float64 worked examples of spec/algorithms.md §1.6.

Tolerance: the spec prints 10 significant digits; rtol=1e-9 checks all of them in float64.
"""

from __future__ import annotations

import pytest
import torch

import optimfx
from optimfx.reference import adafactor as ref

W0 = [[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]]
G1 = [[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]]
G2 = [[-0.05, 0.1, 0.2], [0.02, 0.03, -0.04]]
B0, GB1, GB2 = [0.1, -0.2, 0.3], [0.01, -0.02, 0.0], [0.03, 0.01, -0.01]


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _run(init, grads, **kwargs):
    p = torch.nn.Parameter(_t(init))
    opt = optimfx.AdaFactor([p], backend="reference", **kwargs)
    history = []
    for g in grads:
        p.grad = _t(g)
        opt.step()
        history.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    return history


def _close(actual, expected):
    torch.testing.assert_close(actual, _t(expected), rtol=1e-9, atol=1e-12)


def test_matrix_paper_defaults():
    (w1, s1), (w2, s2) = _run(W0, [G1, G2])
    _close(s1["exp_avg_sq_row"], [0.04666666667, 0.004166666667])
    _close(s1["exp_avg_sq_col"], [0.00625, 0.02, 0.05])
    _close(w1, [[0.4965339935, -0.2961248869, 0.1963237449], [0.09420026176, 0.4, -0.5958989658]])
    _close(s2["exp_avg_sq_row"], [0.02991481566, 0.002328749299])
    _close(s2["exp_avg_sq_col"], [0.003493123948, 0.01164321947, 0.03322900402])
    _close(w2, [[0.4989349595, -0.2987550729, 0.1932099189], [0.09075812756, 0.3971719342, -0.5936669044]])


def test_vector_paper_defaults():
    (b1, s1), (b2, s2) = _run(B0, [GB1, GB2])
    _close(s1["exp_avg_sq"], [1e-4, 4e-4, 1e-30])
    _close(b1, [0.0978397531, -0.1978397531, 0.3])
    _close(s2["exp_avg_sq"], [0.000559479342, 0.0002276952468, 5.743491775e-05])
    _close(b2, [0.09541297425, -0.1991077669, 0.3025247186])


@pytest.mark.parametrize("kwargs, w1, w2", [
    (dict(lr=1e-2, eps=(None, 1e-3), weight_decay=0.1, lr_mode="rho_max", eps_mode="torch",
          decay_mode="torch"),
     [[0.4960339935, -0.2958248869, 0.1961237449], [0.0941002618, 0.3996, -0.5952989658]],
     [[0.4979365069, -0.2981565985, 0.1928169319], [0.0905674947, 0.396375183, -0.5924738539]]),
    (dict(beta1=0.9, weight_decay=0.1),
     [[0.4994586773, -0.2994956555, 0.1995544857], [0.0993810818, 0.3998442224, -0.5993562301]],
     [[0.4991940365, -0.2992950469, 0.1988326718], [0.0984740871, 0.3994041114, -0.5985293864]]),
    (dict(relative_step=False, scale_parameter=False, lr=1e-3), None,
     [[0.4997310614, -0.2996853041, 0.198250582], [0.0976203995, 0.3992684738, -0.5983695919]]),
    (dict(warmup_init=True), None,
     [[0.5000001371, -0.3000001424, 0.199999005], [0.0999987265, 0.3999994302, -0.5999991402]]),
], ids=["torch-weight-decay", "hf-beta1-weight-decay", "external-lr", "warmup-init"])
def test_variants_table(kwargs, w1, w2):
    (p1, _), (p2, _) = _run(W0, [G1, G2], **kwargs)
    if w1 is not None:
        _close(p1, w1)
    _close(p2, w2)


def test_shapes_of_factored_state_for_higher_rank():
    # §1.6: param [L, n_r, n_c] → R: [L, n_r], C: [L, n_c]; each slice factored on its own
    hp = ref.AdaFactorHyper.from_group(optimfx.AdaFactor([torch.nn.Parameter(torch.ones(1))]).param_groups[0])
    state = ref.init_state(torch.zeros(4, 5, 6), hp)
    assert state["exp_avg_sq_row"].shape == (4, 5) and state["exp_avg_sq_col"].shape == (4, 6)
    assert "exp_avg_sq" not in state


def test_slices_of_a_3d_tensor_are_independent():
    """Each leading index is its own factorisation: a [3, 4, 5] tensor steps like three [4, 5] ones.

    The per-tensor scalars (parameter RMS, update RMS for clipping) are switched off so only the
    factored statistics can couple the slices.
    """
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    kw = dict(lr=1e-2, relative_step=False, scale_parameter=False, clip_threshold=1e30)
    whole = torch.nn.Parameter(stack.clone())
    slices = [torch.nn.Parameter(stack[i].clone()) for i in range(3)]
    opt_whole, opt_slices = optimfx.AdaFactor([whole], **kw), optimfx.AdaFactor(slices, **kw)
    for g in grads:
        whole.grad = g.clone()
        for i, s in enumerate(slices):
            s.grad = g[i].clone()
        opt_whole.step()
        opt_slices.step()
    torch.testing.assert_close(whole.detach(), torch.stack([s.detach() for s in slices]), rtol=1e-12, atol=0)
