"""Hypothesis strategies and a runner shared by the property tests.

Tensors are drawn as a shape plus a seed (values come from ``torch.Generator``), so examples stay small
and shrink to small shapes; gradients can carry exact-zero rows and columns, the edge case the
AdaFactor statistics must survive.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

Tensor = torch.Tensor

#: every property test: few examples (CI budget), no deadline (first calls pay torch's warm-up)
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: 0-d to 3-D, size-1 axes included (matrices and batched matrices take AdaFactor's factored path)
shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
seeds = st.integers(0, 2**31 - 1)


def tensor(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype)


@st.composite
def gradients(draw: st.DrawFn, shape: Sequence[int], steps: int, dtype: torch.dtype = torch.float64,
              magnitudes: tuple[int, int] = (-8, 3), away_from_zero: bool = False) -> list[Tensor]:
    """``steps`` gradients of ``shape``, each scaled by 10^k (k drawn in ``magnitudes``) and with
    randomly zeroed rows and columns (whole tensors may be zero). ``away_from_zero``: entries that are
    not zeroed have ``|g| ≥ 0.5·10^k``."""
    out = []
    for _ in range(steps):
        g = tensor(shape, draw(seeds))
        if away_from_zero:
            g = g.sign() * (g.abs() + 0.5)
        g *= 10.0 ** draw(st.integers(*magnitudes))
        if g.dim() >= 1:
            keep_rows = torch.tensor(draw(st.lists(st.booleans(), min_size=shape[0], max_size=shape[0])))
            g[~keep_rows] = 0.0
        if g.dim() >= 2:
            keep_cols = torch.tensor(draw(st.lists(st.booleans(), min_size=shape[-1], max_size=shape[-1])))
            g[..., ~keep_cols] = 0.0
        out.append(g.to(dtype))
    return out


def run(make: Callable[[list[Tensor]], torch.optim.Optimizer], init: Sequence[Tensor],
        grads: Sequence[Sequence[Tensor]]) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Fresh leaves from ``init``, one ``step()`` per entry of ``grads`` (private gradient copies)."""
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt
