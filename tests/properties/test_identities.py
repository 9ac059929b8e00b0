"""Identities every run must satisfy, on random shapes, steps and hyperparameters (reference backend).

* elementwise optimizers (AdaX, AdaXW, AdamW) commute with permutations of the parameter's elements;
* every optimfx optimizer commutes with permutations of its parameter list;
* AdaX's stable recursion equals the official raw one (``reference/adax.py::raw_step_``);
* ChildTuning with ``reserve_p = 1`` is its base, and EGStepSize with a zero meta step is its base;
* elementwise optimizers never produce NaN from finite inputs.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import optimfx
from _strategies import FAST, gradients, run, seeds, shapes, tensor
from optimfx.reference import adax as adax_ref

STEPS = 3

ELEMENTWISE = {
    "AdaX": lambda ps, **kw: optimfx.AdaX(ps, backend="reference", **kw),
    "AdaXW": lambda ps, **kw: optimfx.AdaXW(ps, backend="reference", **kw),
    "AdamW": lambda ps, **kw: optimfx.AdamW(ps, backend="reference", **kw),
}
ALL = {**ELEMENTWISE, "AdaFactor": lambda ps, **kw: optimfx.AdaFactor(ps, backend="reference", **kw)}
#: keyword cases every optimizer of ALL accepts
elementwise_kwargs = st.fixed_dictionaries({
    "weight_decay": st.sampled_from([0.0, 1e-2, 0.5]),
    "maximize": st.booleans(),
})
#: bases for the wrappers: torch.optim and optimfx, with and without momentum
BASES = {
    "torch-sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "torch-adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "optimfx-adax": lambda ps: optimfx.AdaX(ps, lr=1e-2, backend="reference"),
    "optimfx-adafactor": lambda ps: optimfx.AdaFactor(ps, backend="reference"),
}


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


@FAST
@given(name=st.sampled_from(list(ELEMENTWISE)), shape=shapes, seed=seeds, kwargs=elementwise_kwargs,
       data=st.data())
def test_elementwise_optimizers_commute_with_element_permutations(name, shape, seed, kwargs, data):
    """Permuting θ's elements and every gradient's the same way permutes the result and the state."""
    perm = torch.randperm(_numel(shape), generator=torch.Generator().manual_seed(seed))

    def permuted(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)[perm].reshape(x.shape)

    init = tensor(shape, seed)
    grads = data.draw(gradients(shape, STEPS))
    plain, opt = run(lambda ps: ELEMENTWISE[name](ps, **kwargs), [init], [[g] for g in grads])
    moved, opt_moved = run(lambda ps: ELEMENTWISE[name](ps, **kwargs), [permuted(init)],
                           [[permuted(g)] for g in grads])
    # elementwise maths in float64: each element sees the same operations wherever it sits
    assert torch.equal(permuted(plain[0]), moved[0])
    [state], [state_moved] = opt.state.values(), opt_moved.state.values()
    for key, value in state.items():
        expected = value if key == "step" else permuted(value)
        assert torch.equal(expected, state_moved[key]), key


@FAST
@given(name=st.sampled_from(list(ALL)), layout=st.lists(shapes, min_size=2, max_size=4), seed=seeds,
       data=st.data())
def test_optimizers_commute_with_parameter_list_permutations(name, layout, seed, data):
    """Listing the parameters in another order gives every parameter the same result.

    Bit for bit for the elementwise optimizers. AdaFactor steps same-shape small tensors as one stack
    (``reference/stacking.py``), whose row sums and RMS values may round differently by the slice's
    position in memory (vectorised reductions over a differently aligned start): a few float64 ulps
    (observed ≤ 2) after these steps, so ``rtol=1e-13``.
    """
    order = data.draw(st.permutations(range(len(layout))))
    init = [tensor(s, seed + i) for i, s in enumerate(layout)]
    grads = list(zip(*[data.draw(gradients(s, STEPS)) for s in layout]))
    plain, _ = run(ALL[name], init, grads)
    moved, _ = run(ALL[name], [init[i] for i in order], [[gs[i] for i in order] for gs in grads])
    for j, i in enumerate(order):
        if name in ELEMENTWISE:
            assert torch.equal(plain[i], moved[j])
        else:
            torch.testing.assert_close(moved[j], plain[i], rtol=1e-13, atol=1e-15)


@FAST
@given(shape=shapes, seed=seeds, beta1=st.floats(0.0, 0.99), beta2=st.floats(1e-5, 0.1),
       eps=st.sampled_from([0.0, 1e-12, 1e-6]), weight_decay=st.sampled_from([0.0, 1e-2]),
       decoupled=st.booleans(), steps=st.integers(1, 30))
def test_adax_stable_recursion_equals_the_raw_one(shape, seed, beta1, beta2, eps, weight_decay, decoupled,
                                                  steps):
    """``v̂ = v_raw / c_t`` with the stable weight reproduces the official raw recursion, θ included.

    float64, compared at rtol 1e-11: each step rounds both recursions differently by a few ulps
    (the log-form c_t, the two ε placements), and 30 steps of growth leave well under 1e-12.
    """
    hp = adax_ref.AdaXHyper(beta1, beta2, eps, "official", weight_decay, decoupled, False)
    stable, raw = tensor(shape, seed), tensor(shape, seed)
    m_s, v_s, m_r, v_r = (torch.zeros_like(stable) for _ in range(4))
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(1, steps + 1):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        adax_ref.step_(stable, g, {"exp_avg": m_s, "exp_avg_sq": v_s}, hp, adax_ref.host_scalars(t, hp), 1e-2)
        adax_ref.raw_step_(raw, g, m_r, v_r, t, hp, 1e-2)
    c_t = (1.0 + beta2) ** steps - 1.0
    torch.testing.assert_close(v_s, v_r / c_t, rtol=1e-11, atol=0.0)
    torch.testing.assert_close(stable, raw, rtol=1e-11, atol=1e-13)


@FAST
@given(base=st.sampled_from(list(BASES)), layout=st.lists(shapes, min_size=1, max_size=3), seed=seeds,
       data=st.data())
def test_child_tuning_with_reserve_p_one_is_the_base(base, layout, seed, data):
    init = [tensor(s, seed + i) for i, s in enumerate(layout)]
    grads = list(zip(*[data.draw(gradients(s, STEPS)) for s in layout]))
    plain, _ = run(BASES[base], init, grads)
    wrapped, _ = run(lambda ps: optimfx.ChildTuning(BASES[base](ps), "F", reserve_p=1.0, seed=seed), init, grads)
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped))


@FAST
@given(name=st.sampled_from(["AdamW", "AdaX", "AdaFactor"]), layout=st.lists(shapes, min_size=1, max_size=3),
       seed=seeds, data=st.data())
def test_fused_child_tuning_f_with_reserve_p_one_is_the_plain_optimizer(name, layout, seed, data):
    init = [tensor(s, seed + i) for i, s in enumerate(layout)]
    grads = list(zip(*[data.draw(gradients(s, STEPS)) for s in layout]))
    plain, _ = run(ALL[name], init, grads)
    masked, _ = run(lambda ps: ALL[name](ps, child_tuning_mode="F", reserve_p=1.0, seed=seed), init, grads)
    assert all(torch.equal(a, b) for a, b in zip(plain, masked))


@FAST
@given(base=st.sampled_from(list(BASES)), layout=st.lists(shapes, min_size=1, max_size=3), seed=seeds,
       scope=st.sampled_from(["tensor", "group", "global"]), normalize=st.booleans(), data=st.data())
def test_eg_with_a_zero_meta_step_is_the_base(base, layout, seed, scope, normalize, data):
    """γ_s = γ_p = 0, μ = 0, η = 1: scale and gains stay 1, ν = d, and θ_t is the base's θ bit for bit."""
    init = [tensor(s, seed + i) for i, s in enumerate(layout)]
    grads = list(zip(*[data.draw(gradients(s, STEPS)) for s in layout]))
    plain, _ = run(BASES[base], init, grads)
    wrapped, _ = run(lambda ps: optimfx.EGStepSize(BASES[base](ps), lr=1.0, momentum=0.0, gamma_scale=0.0,
                                                   gamma_gain=0.0, scope=scope, normalize=normalize,
                                                   backend="reference"), init, grads)
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped))


@FAST
@given(name=st.sampled_from(list(ELEMENTWISE)), shape=shapes, seed=seeds,
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       lr=st.sampled_from([0.0, 1e-3, 1.0]), kwargs=elementwise_kwargs, data=st.data())
def test_elementwise_optimizers_never_nan_from_finite_inputs(name, shape, seed, dtype, lr, kwargs, data):
    grads = data.draw(gradients(shape, STEPS + 1, dtype))
    params, opt = run(lambda ps: ELEMENTWISE[name](ps, lr=lr, **kwargs), [tensor(shape, seed, dtype)],
                      [[g] for g in grads])
    assert params[0].isfinite().all()
    for key, value in opt.state[next(iter(opt.state))].items():
        assert value.isfinite().all(), key
