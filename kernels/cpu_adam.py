"""Host side of ``cpu_adam.c``: ATen's fused Adam step (no bias correction) with a ChildTuning
gradient mask computed inside the update loop, for fp32 CPU tensors.

The masked step otherwise masks each gradient into a buffer with a dozen ATen ops (the F mask's
hash alone is about ten integer passes) before ATen's fused Adam kernel reads it back; here the
mask is computed per element where the gradient is loaded, as the Triton kernels do, and the step
costs about what the unmasked one costs. The F mask is bitwise
:func:`optimfx.reference.child_tuning.bernoulli_keep`'s (tested), and the update is ATen's formula,
so a step equals the per-tensor reference step to rounding.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Optional, Sequence

import torch

from . import cpu_build, cpu_launcher

Tensor = torch.Tensor
NAME = "cpu_adam"
#: mask modes of the kernel
MASK_NONE, MASK_BERNOULLI, MASK_STORED = 0, 1, 2
_DECOUPLED, _MAXIMIZE = 1, 2
_MASK_DTYPES = (torch.uint8, torch.bool)
_LIB = cpu_build.Library(NAME, {
    "optimfx_adam_tasks": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64], None),
    "optimfx_bernoulli_grad": ([ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4
                               + [ctypes.c_double, ctypes.c_int64], None),
    "optimfx_stored_mask_grad": ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2, None),
})


def available() -> bool:
    """Whether the kernel is built (building it on the first call) and enabled; the F mask's bits
    are read as little-endian 16-bit halves of each pair's hash."""
    return sys.byteorder == "little" and _LIB.available()


def takes_mask(mask: Tensor, param: Tensor) -> bool:
    """A stored 0/1 mask of one byte per element of ``param``, contiguous on the CPU."""
    return (mask.dtype in _MASK_DTYPES and mask.device.type == "cpu" and mask.is_contiguous()
            and mask.numel() == param.numel())


def step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
         exp_avg_sqs: Sequence[Tensor], *, lr: float, beta1: float, beta2: float, weight_decay: float,
         eps: float, decoupled: bool, maximize: bool, mask_mode: int = MASK_NONE,
         keys: Optional[Sequence[int]] = None, offsets: Optional[Sequence[int]] = None,
         threshold: int = 0, keep_scale: float = 1.0, masks: Optional[Sequence[Optional[Tensor]]] = None) -> None:
    """One step of every tensor: fp32 CPU tensors, contiguous, parameter, gradient and moments of one
    size (``optimfx.reference.aten_fused.takes``), masks that :func:`takes_mask` takes, and
    :func:`available` true. The kernel reads raw memory: nothing else is checked here.

    ``mask_mode`` :data:`MASK_BERNOULLI` takes each tensor's 64-bit F-mask key in ``keys``, the
    global index of its first element in ``offsets`` (0 but for a shard), the keep threshold ``T``
    and the rescale of kept entries; :data:`MASK_STORED` takes each tensor's 0/1 byte mask in
    ``masks`` (``None`` leaves that tensor unmasked). ``grads`` are only read.
    """
    n = len(params)
    keys = keys or [0] * n
    offsets = offsets or [0] * n
    masks = masks or [None] * n
    rows = []
    for p, g, m, v, mask, offset, key in zip(params, grads, exp_avgs, exp_avg_sqs, masks, offsets, keys):
        rows += (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if mask is None else mask.data_ptr(),
                 offset, key - (1 << 64) if key >> 63 else key)
    table = torch.tensor(rows, dtype=torch.int64)
    scalars = (ctypes.c_double * 6)(lr, beta1, beta2, weight_decay, eps, keep_scale)
    flags = (_DECOUPLED if decoupled else 0) | (_MAXIMIZE if maximize else 0) | (mask_mode << 8) | (threshold << 16)
    cpu_launcher.run(_LIB.function("optimfx_adam_tasks"), _LIB.openmp, table, [p.numel() for p in params], scalars,
                     flags)
    cpu_build.written([*params, *exp_avgs, *exp_avg_sqs])


def bernoulli_grad(grad: Tensor, key: int, offset: int, threshold: int, keep_scale: float) -> Optional[Tensor]:
    """``0 + g ⊙ keep · keep_scale`` as a new tensor, bitwise
    :func:`optimfx.reference.child_tuning.bernoulli_grad` (one pass instead of its dozen ATen ops), or
    ``None`` when the kernel cannot take ``grad`` (not a contiguous fp32 CPU tensor, or not built)."""
    if not (grad.device.type == "cpu" and grad.dtype == torch.float32 and grad.is_contiguous()
            and grad.numel() and available()):
        return None
    out = torch.empty_like(grad)
    _LIB.function("optimfx_bernoulli_grad")(grad.data_ptr(), out.data_ptr(), grad.numel(), offset,
                                             key - (1 << 64) if key >> 63 else key, threshold, keep_scale,
                                             _LIB.threads(grad.numel()))
    return out


def stored_mask_grad(grad: Tensor, mask: Tensor) -> Optional[Tensor]:
    """``g ⊙ M`` as a new tensor, bitwise ``optimfx.reference.child_tuning.apply_mask(grad, M, 1)``
    (one pass, no cast of the mask), or ``None`` when the kernel cannot take them (a contiguous fp32
    CPU gradient and a contiguous one-byte mask of its size, the kernel built)."""
    if not (grad.device.type == "cpu" and grad.dtype == torch.float32 and grad.is_contiguous()
            and grad.numel() and takes_mask(mask, grad) and available()):
        return None
    out = torch.empty_like(grad)
    _LIB.function("optimfx_stored_mask_grad")(grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel(),
                                               _LIB.threads(grad.numel()))
    return out

