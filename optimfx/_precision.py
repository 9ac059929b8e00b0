"""Precision policy: optimizer maths and state in fp32 whatever the parameter dtype.

* bf16/fp16 parameters are up-cast for the update and rounded once when written back.
* Optimizer state is fp32 (fp64 for fp64 parameters, so the reference can run in float64).
* ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to the parameter's dtype;
  :func:`restore_state_dtypes` undoes that for optimfx state (see ``FxOptimizer.load_state_dict``).
* bf16 parameters are written either to nearest even (the default) or, with
  ``bf16_rounding="stochastic"``, by unbiased stochastic rounding (:func:`stochastic_round_bf16`)
  whose random thresholds come from a counter-based hash, so a run is reproducible and every
  data-parallel rank rounds identically without communicating.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

#: values of the ``bf16_rounding`` option of every optimfx optimizer
BF16_ROUNDINGS = ("nearest", "stochastic")
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
# lowbias32 multipliers (C. Wellons, "hash-prospector"): a 32-bit integer hash with low bias
_MIX_A, _MIX_B = 0x7FEB352D, 0x846CA68B
#: the stochastic-rounding key of the tensor being written, or None for round-to-nearest
_round_key: ContextVar[int | None] = ContextVar("optimfx_round_key", default=None)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the update maths runs in, and the dtype of floating optimizer state."""
    return torch.float64 if param_dtype in (torch.float64, torch.complex128) else torch.float32


def real_view(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are optimised as their ``(..., 2)`` real view, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


def working_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it already has the compute dtype, else an up-cast copy."""
    target = compute_dtype(t.dtype)
    return t if t.dtype == target else t.to(target)


def restored_state(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved state tensor as an optimizer keeps it for ``param``: floating state in the policy's
    dtype (:func:`compute_dtype`, where ``torch.optim`` would cast to the parameter's), on the
    parameter's device (a DTensor stays one), never sharing the saved tensor's memory (``.to``
    returns the tensor itself when nothing changes, and a live optimizer may be its owner)."""
    dtype = compute_dtype(param.dtype) if value.is_floating_point() else value.dtype
    restored = value.detach().to(device=param.device, dtype=dtype)
    return restored.clone() if restored.data_ptr() == value.data_ptr() else restored


def write_back_(param: torch.Tensor, param32: torch.Tensor) -> None:
    """Round the fp32 working copy into the parameter once (no-op when they alias).

    To nearest even, or stochastically for a bf16 parameter written inside :func:`rounding` with a
    key (the dispatcher opens it per tensor and step when ``bf16_rounding="stochastic"``).
    """
    if param32 is param:
        return
    key = _round_key.get()
    if key is not None and param.dtype == torch.bfloat16 and param32.dtype == torch.float32:
        param.copy_(stochastic_round_bf16(param32, key))
    else:
        param.copy_(param32)


@contextmanager
def rounding(key: int | None) -> Iterator[None]:
    """Writes of bf16 parameters inside the block round stochastically with ``key`` (``None``:
    to nearest even)."""
    token = _round_key.set(key)
    try:
        yield
    finally:
        _round_key.reset(token)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def round_key(seed: int, step: int) -> int:
    """The stochastic-rounding key of ``step`` for ``seed``: odd, in ``[3, 2^31)``.

    Odd and above 1 so that a Triton kernel taking it as an integer argument compiles one
    specialisation only (Triton specialises integers equal to 1 or divisible by 16).
    """
    key = (_splitmix64(_splitmix64(seed & _M64) ^ step) >> 33) | 1
    return key if key > 1 else 3


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x·c mod 2^32 for int64 x in [0, 2^32), split in 16-bit halves so no product overflows int64
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash on int64 tensors holding uint32 values (``kernels/_common.mix32``)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_A)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_B)
    return x ^ (x >> 16)


def stochastic_round_bf16(x: torch.Tensor, key: int) -> torch.Tensor:
    r"""fp32 → bf16 rounding up with probability equal to the discarded fraction (unbiased).

    For the fp32 bit pattern :math:`b` of element :math:`i` (row-major index) and a 16-bit threshold
    :math:`r_i \in [0, 2^{16})`, the result is the top half of :math:`b + r_i`: the magnitude rounds
    away from zero with probability :math:`\mathrm{frac}/2^{16}`, so :math:`E[\mathrm{round}(x)] = x`.
    The threshold is a counter-based hash (no generator state)::

        h = mix32(lo32(i) ^ key);  r = mix32(h ^ hi32(i) ^ (b >> 16) << 16) >> 16

    of the step key (:func:`round_key`), the index and the bf16 truncation of the value, which
    decorrelates equal indices of different tensors. inf stays inf; NaN stays NaN.

    References:
        Gupta et al, `Deep Learning with Limited Numerical Precision
        <https://arxiv.org/abs/1502.02551>`_, 2015.
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    h = mix32((index & _M32) ^ key)
    r = mix32(h ^ (index >> 32) ^ ((bits >> 16) << 16)) >> 16
    rounded = ((bits + r) >> 16).to(torch.int32)
    # top half of the pattern as a signed 16-bit integer, reinterpreted as bf16
    rounded = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16).view(torch.bfloat16)
    return torch.where(x.isnan(), x.to(torch.bfloat16), rounded)


def state_like(param: torch.Tensor) -> torch.Tensor:
    """A zero state buffer shaped like ``param``'s real view, in the policy dtype."""
    view = real_view(param)
    return torch.zeros(view.shape, dtype=compute_dtype(param.dtype), device=param.device)
