"""Stochastic rounding of bf16 parameters (``bf16_rounding="stochastic"``): unbiased, keeps updates
that round-to-nearest loses, reproducible from its seed, and the same bits in the reference and in
the Triton kernels.

Tolerances: a stochastic rounding of ``x`` is ``lo + u·B`` with ``u`` the bf16 spacing at ``x`` and
``B ~ Bernoulli(f)``, ``f = (x − lo)/u``; the mean of ``n`` independent roundings has standard
deviation ``u·sqrt(f(1 − f)/n) ≤ u/(2·sqrt(n))``. The checks allow 6 of those (a false failure has
probability ~1e-9 for truly random thresholds; the thresholds are a fixed hash, so each test is
deterministic).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import optimfx
from optimfx import _dispatch
from optimfx._precision import round_key, rounding, stochastic_round_bf16, write_back_

SIGMAS = 6

try:
    import triton
    import triton.language as tl
    from optimfx._kernels._common import store_cast_stochastic

    @triton.jit
    def _store_kernel(x_ptr, y_ptr, n, key, BLOCK: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        store_cast_stochastic(y_ptr, o, tl.load(x_ptr + o, mask=m, other=0.0), m, key, True)
except ImportError:  # the Triton tests skip
    pass


def _spacing(x: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at ``x`` (one ULP of its binade)."""
    lo = x.to(torch.bfloat16).float()
    return torch.ldexp(torch.ones_like(x), torch.frexp(lo).exponent - 8)


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above ``x`` in magnitude (truncation and one ULP away from zero)."""
    bits = x.view(torch.int32) & ~0xFFFF
    lo = bits.view(torch.float32)
    return lo, lo + torch.sign(x) * _spacing(lo)


def _require_triton() -> None:
    if not (optimfx.triton_available() and _dispatch.interpreting()):
        pytest.skip("Triton on CPU tensors needs Triton and TRITON_INTERPRET=1")


def test_each_result_is_a_neighbour_and_special_values_stay():
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    y = stochastic_round_bf16(x, round_key(0, 1)).float()
    lo, hi = _neighbours(x)
    assert torch.all((y == lo) | (y == hi))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0, -2.0])
    assert torch.equal(stochastic_round_bf16(special, 7).float(), special)
    assert stochastic_round_bf16(torch.tensor([float("nan")]), 7).isnan().all()


def test_unbiased_over_elements_and_over_steps():
    # one value at 2^16 indices (one key), then 64 values over 256 steps (keys)
    x = torch.full((1 << 16,), 1.0 + 0.3 * 2**-7)
    mean = stochastic_round_bf16(x, round_key(0, 1)).double().mean()
    u = float(_spacing(x[:1]))
    assert abs(mean - x[0].double()) <= SIGMAS * u / (2 * math.sqrt(x.numel()))
    x = torch.randn(64) * 3
    total = torch.zeros(64, dtype=torch.float64)
    steps = 256
    for step in range(1, steps + 1):
        total += stochastic_round_bf16(x, round_key(5, step)).double()
    tol = SIGMAS * _spacing(x).double() / (2 * math.sqrt(steps))
    assert torch.all((total / steps - x.double()).abs() <= tol)


def test_small_updates_accumulate_where_round_to_nearest_loses_them():
    """``θ ← θ + 1e-4`` for 200 steps from 1.0 (half a bf16 ULP there is 2^-8 ≈ 3.9e-3)."""
    steps, delta = 200, 1e-4
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    stochastic = nearest.clone()
    for step in range(1, steps + 1):
        write_back_(nearest, nearest.float() + delta)
        with rounding(round_key(0, step)):
            write_back_(stochastic, stochastic.float() + delta)
    assert torch.all(nearest == 1.0)
    # a random walk of 200 roundings, each with variance ≤ u²/4 around its mean, per element
    u = 2**-7
    tol = SIGMAS * u / 2 * math.sqrt(steps) / math.sqrt(nearest.numel())
    assert abs(stochastic.double().mean() - (1.0 + steps * delta)) <= tol


#: optimizers with a Triton apply pass that writes parameters (AdaFactor's factored and flat paths)
OPTIMIZERS = {
    "AdaXW": lambda groups, backend: optimfx.AdaXW(groups, lr=1e-4, weight_decay=0.0, backend=backend),
    "AdamW": lambda groups, backend: optimfx.AdamW(groups, lr=1e-4, weight_decay=0.0, backend=backend),
    "AdaFactor": lambda groups, backend: optimfx.AdaFactor(groups, lr=1e-4, relative_step=False,
                                                           scale_parameter=False, backend=backend),
}


def _bf16_run(backend: str, seed: int, rounding_mode: str = "stochastic", steps: int = 20,
              dtype: torch.dtype = torch.bfloat16, optimizer: str = "AdaXW"):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16).to(dtype))
              for s in ((64, 33), (5,))]
    opt = OPTIMIZERS[optimizer]([{"params": params, "bf16_rounding": rounding_mode, "rounding_seed": seed}],
                                backend)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return params


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_an_optimizer_moves_bf16_weights_by_tiny_steps_only_with_stochastic_rounding(optimizer):
    """A constant gradient and no decay step every weight by the same ``≤ lr = 1e-4`` (Adam's and
    AdaX's ``m/√v`` and AdaFactor's clipped ``G/√V`` are all 1 here), far below half a bf16 ULP:
    round-to-nearest never moves a weight of magnitude ≥ 2^-4, while the stochastic run follows the
    fp32 run from the same start (its error is a sum of independent zero-mean roundings: variance
    ≤ u²/4 per element and step)."""
    steps = 20
    run = functools.partial(_bf16_run, "reference", 0, optimizer=optimizer)
    start = run(steps=0)[0].detach().double()
    nearest = run("nearest", steps)[0].detach().double()
    stochastic = run(steps=steps)[0].detach().double()
    exact = run(steps=steps, dtype=torch.float32)[0].detach().double()
    big = start.abs() >= 2**-4  # half a ULP there, 2^-13, exceeds every step
    assert torch.equal(nearest[big], start[big])
    assert (exact - start).abs().min() > 5e-4  # the fp32 run moved every weight
    u = _spacing(start.float()).double()[big]
    tol = SIGMAS * math.sqrt((u**2).sum() * steps / 4) / big.sum()
    assert abs((stochastic - exact)[big].mean()) <= tol


def test_same_seed_same_bits_other_seed_other_bits():
    a, b, c = (_bf16_run("reference", seed, steps=3) for seed in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_kernel_store_is_bit_identical_to_the_reference():
    _require_triton()
    x = torch.randn(3000) * torch.logspace(-20, 20, 3000)
    x[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, 3.3e38])
    y = torch.empty(3000, dtype=torch.bfloat16)
    key = round_key(11, 7)
    _store_kernel[(3,)](x, y, x.numel(), key, BLOCK=1024)
    assert torch.equal(y.view(torch.int16), stochastic_round_bf16(x, key).view(torch.int16))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_triton_backend_matches_the_reference_backend(optimizer):
    """Both backends hash the same (seed, step, index, value) into the same thresholds. Their fp32
    results may differ in the last fp32 bits (tolerances.py), which flips a stochastic rounding only
    when the threshold falls between them (probability ~2^-14 per element and step): at most a
    handful of elements may differ, by one bf16 ULP. Round-to-nearest would leave every weight where
    it started (the test above), so equal moved weights show the kernels rounded stochastically."""
    _require_triton()
    ref, tri = (_bf16_run(backend, 1, steps=4, optimizer=optimizer) for backend in ("reference", "triton"))
    for r, t in zip(ref, tri):
        differ = r != t
        assert differ.sum() <= 2
        assert torch.all((r.float() - t.float()).abs()[differ] <= _spacing(r.float())[differ])


def test_bad_bf16_rounding_names_the_argument():
    with pytest.raises(ValueError, match=r"^Invalid bf16_rounding: 'up'"):
        optimfx.AdaXW([{"params": [torch.nn.Parameter(torch.ones(2))], "bf16_rounding": "up"}])
