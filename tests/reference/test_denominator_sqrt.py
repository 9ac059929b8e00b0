"""The Adam-type denominator's square root: clamping zeros and subnormals (ChildTuning-D groups, for
CPU speed) never changes a denominator bit."""

from __future__ import annotations

import pytest
import torch

import optimfx
from optimfx.reference import adamw as adamw_ref
from optimfx.reference import adax as adax_ref
from optimfx.reference import common


def _second_moments(dtype: torch.dtype) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(4096, generator=gen, dtype=torch.float64).to(dtype) * 1e-6
    v[::3] = 0.0
    v[1::7] = tiny / 3  # subnormal
    v[2::11] = tiny
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps, scale", [(1e-8, 1.0), (1e-8, 31.62), (1e-6, 1.0), (1e-12, 1.0)])
def test_clamped_denominator_is_bit_identical(dtype, eps, scale):
    v = _second_moments(dtype)
    plain = torch.sqrt(v).mul_(scale).add_(eps)
    clamped = common.denominator_sqrt(v, eps, scale, zeros_likely=True).mul_(scale).add_(eps)
    assert torch.equal(plain, clamped)


@pytest.mark.parametrize("eps", [0.0, 1e-30])
def test_no_clamp_where_it_would_show(eps):
    v = _second_moments(torch.float32)
    # sqrt(tiny) ≈ 1.1e-19 is not negligible next to these ε: the zeros must stay zeros
    assert torch.equal(common.denominator_sqrt(v, eps, zeros_likely=True), torch.sqrt(v))


@pytest.mark.parametrize("make", [
    lambda ps: optimfx.AdamW(ps, lr=1e-2, child_tuning_mode="D"),
    lambda ps: optimfx.AdaXW(ps, lr=1e-2, child_tuning_mode="D"),
], ids=["AdamW", "AdaXW"])
def test_d_mode_steps_equal_the_plain_square_root(make, monkeypatch):
    def run():
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(64, 48, generator=gen)) for _ in range(2)]
        opt = make(params)
        opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < 0.3 for p in params})
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            opt.step()
        return [p.detach().clone() for p in params], opt

    fast, opt = run()
    assert any((s["exp_avg_sq"] == 0).any() for s in opt.state.values())  # the case being sped up
    with monkeypatch.context() as m:
        plain_sqrt = lambda v, eps, scale=1.0, *, zeros_likely=False, out=None: torch.sqrt(v, out=out)  # noqa: E731
        for module in (common, adamw_ref, adax_ref):
            m.setattr(module, "denominator_sqrt", plain_sqrt)
        slow, _ = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
