"""Tolerances for comparing an optimfx backend with the reference backend, per dtype, with reasons.

``eps`` below is ``torch.finfo(dtype).eps``, the spacing of the dtype at 1.0 (one ULP there; the
spacing at ``x`` is between ``eps·|x|/2`` and ``eps·|x|``). The tolerances assume unit-scale test
data (``randn`` parameters and gradients, a few steps), which is what the conformance suite uses.

Profile ``"pointwise"`` (elementwise optimizers: AdaX, AdaXW):

* fp32 and fp64 (maths in the parameter dtype): each backend rounds about a dozen times per element
  per step (the moments, the square root, the division, the update; the Triton kernel also rounds the
  host's float64 scalars ``1 − b1``, ``w_t``, ``ε_eff`` and ``lr`` to fp32) and in a different order.
  Over 5 steps that is ~120 roundings on each side, so ``rtol = 2^7·eps`` (fp32: 1.5e-5). Where a
  value is the cancellation of O(1) terms (``m`` when ``b1·m ≈ −(1 − b1)·g``) the relative error is
  unbounded but the absolute one is a few roundings of O(1) per step: ``atol = 2^4·eps``.
* bf16 and fp16 parameters: both backends compute in fp32 and round once to the parameter dtype;
  a result within fp32 noise of a rounding boundary may round the other way, so parameters agree to
  one ULP of their dtype: ``rtol = eps`` (bf16 2^-7, fp16 2^-10). Their fp32 state sees that one-ULP
  parameter difference (coupled L2 adds ``λ·θ``), so state is held to the same bound. Near zero the
  numbers are fp32 state or fp32 results rounded once, so ``atol`` is fp32's.

AdaFactor uses ``"pointwise"`` too. Its step adds reductions (RMS(θ), the row and column means,
R̄, ΣU²) that each backend sums in its own order, but over the suite's tensors (at most 24 elements
per reduction) a sum is a few roundings, and the factored update is about a dozen roundings per
element like the elementwise optimizers'; its row/column statistics depend on the gradients only, so
the same bounds hold for its state. (Large tensors are compared at their own tolerances in
``tests/kernels/test_adafactor.py``.)

EGStepSize (the rows around AdaX and around SGD) uses ``"pointwise"`` as well. On top of its base's
step it adds, per tensor, four sums (``⟨ν, g⟩, ‖ν‖², ‖g‖², ‖m‖²``: per tile in fp32 in the kernel,
``dot`` products, and ``_foreach_norm`` for small tensors, in the reference), a cosine and two ``exp``; over the suite's tensors a
sum is a few roundings, so the scale and gains differ by a few fp32 ulps, and the elementwise rest
(``d``, gains, velocity, parameter, average) is fewer roundings per element than AdaX's. Those ulps of
the scale multiply a step of ``lr = 1e-2``: on unit-scale parameters the bounds above hold with room.
(Larger tensors: ``tests/kernels/test_eg.py``.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tol(NamedTuple):
    rtol: float
    atol: float


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


_FP32_ATOL = 2**4 * _eps(torch.float32)

TOLERANCES: dict[str, dict[torch.dtype, Tol]] = {
    "pointwise": {
        torch.float64: Tol(2**7 * _eps(torch.float64), 2**4 * _eps(torch.float64)),
        torch.float32: Tol(2**7 * _eps(torch.float32), _FP32_ATOL),
        torch.bfloat16: Tol(_eps(torch.bfloat16), _FP32_ATOL),
        torch.float16: Tol(_eps(torch.float16), _FP32_ATOL),
    },
}


def tolerance(key: str, dtype: torch.dtype) -> Tol:
    """The tolerance of profile ``key`` for parameters of ``dtype`` (complex: its real dtype)."""
    if dtype.is_complex:
        dtype = torch.empty((), dtype=dtype).real.dtype
    return TOLERANCES[key][dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, key: str, dtype: torch.dtype,
                 msg: str = "") -> None:
    """``actual`` matches ``expected`` (same dtype and shape) within the ``key`` tolerance for
    parameters of ``dtype``; state tensors pass their parameter's dtype (see module docstring)."""
    tol = tolerance(key, dtype)
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
