"""Pieces every reference optimizer shares: gradient preparation, the apply step, sums of squares."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import child_tuning as ct


def prepare_grad(grad: torch.Tensor, param32: torch.Tensor, *, maximize: bool, l2: float,
                 mask: Optional[ct.MaskHyper] = None, state: Optional[dict] = None) -> torch.Tensor:
    """The gradient the direction sees: fp32, ChildTuning-masked, negated for ``maximize``, plus
    coupled L2 ``l2·θ``.

    ``mask`` (the group's ChildTuning options, with the tensor's ``state``) applies the gradient mask
    of :func:`~optimfx.reference.child_tuning.mask_grad` to the loss gradient, before the sign and the
    L2 term, as every kernel does where it loads ``g``. Returns ``grad`` itself only when nothing
    changes it; it is never written in place, so the user's ``p.grad`` stays as it was.
    """
    # the parameter's compute dtype (a gradient of another dtype than its parameter is allowed)
    g = grad if grad.dtype == param32.dtype else grad.to(param32.dtype)
    if mask is not None and mask.mode is not None:
        g = ct.mask_grad(g, state, mask)
    private = g is not grad
    if maximize:
        g = g.neg_() if private else torch.neg(g)
        private = True
    if l2 != 0.0:
        g = g.add_(param32, alpha=l2) if private else g.add(param32, alpha=l2)
    return g


def apply_(param32: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, lr: float,
           decoupled_weight_decay: float, *, direction_scale: float = 1.0, decay_first: bool = True) -> None:
    """``θ ← θ·(1 − lr·λ) − lr·s·d`` with ``d = numerator / denominator`` (decoupled weight decay,
    Loshchilov & Hutter, then the step): the step is one ``addcdiv_``, so ``d`` is never stored.

    ``decay_first=False`` decays the already-updated parameter, ``θ ← (θ − lr·s·d)·(1 − lr·λ)``, the
    order of the legacy transformers AdamW that ChildTuning's official code uses.
    """
    decay = decoupled_weight_decay != 0.0
    if decay and decay_first:
        param32.mul_(1.0 - lr * decoupled_weight_decay)
    param32.addcdiv_(numerator, denominator, value=-lr * direction_scale)
    if decay and not decay_first:
        param32.mul_(1.0 - lr * decoupled_weight_decay)


#: ATen's parallel grain size: smaller tensors are reduced single-threaded (no OpenMP wake-ups)
BLAS_MIN_NUMEL = 32768


def sum_sq(x: torch.Tensor) -> torch.Tensor:
    """``Σ x²`` (a fresh 0-d tensor): for a large contiguous tensor one BLAS dot product with itself,
    about twice as fast on CPU as ``vector_norm`` (which accumulates fp32 in float64); else
    ``vector_norm²`` (small tensors stay in ATen, below its grain size, single-threaded)."""
    if x.numel() < BLAS_MIN_NUMEL or not x.is_contiguous():
        return torch.linalg.vector_norm(x).square_()
    flat = x.view(-1)
    return torch.dot(flat, flat)


def sums_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[Σ x²]`` of each tensor (a 1-D tensor on the first one's device): BLAS dot products for large
    contiguous tensors (:func:`sum_sq`), one ``_foreach_norm`` for the others (one call for many small
    tensors instead of one each)."""
    if not tensors:
        return torch.zeros(0)
    is_small = [x.numel() < BLAS_MIN_NUMEL or not x.is_contiguous() for x in tensors]
    small = [x for x, s in zip(tensors, is_small) if s]
    small_sums = iter(torch.stack(torch._foreach_norm(small, 2)).square_() if small else ())
    device = tensors[0].device
    return torch.stack([next(small_sums).to(device) if s else sum_sq(x).to(device)
                        for x, s in zip(tensors, is_small)])


def denominator_sqrt(v: torch.Tensor, eps: float, scale: float = 1.0, *, zeros_likely: bool = False,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sqrt(v)`` for an Adam-type denominator ``scale·sqrt(v) + ε`` (into ``out`` when given).

    ``zeros_likely`` (a ChildTuning-D group, whose unselected entries keep ``v = 0`` exactly): on
    CPU, ``sqrt`` of zeros and subnormals takes a slow path, 8x and 30x slower than of normal numbers
    (AVX2, torch 2.13; it made a D-mode AdamW step 2x the unmasked one). ``v`` is then clamped to the
    smallest normal number first, where that cannot change the denominator: ``scale·sqrt(tiny)``
    below a quarter of ε's ulp, so ``scale·sqrt(v) + ε`` rounds to ε either way. Otherwise (a tiny
    or zero ε) the plain ``sqrt``.
    """
    finfo = torch.finfo(v.dtype)
    if zeros_likely and scale * math.sqrt(finfo.tiny) < eps * finfo.eps / 8:
        return torch.clamp(v, min=finfo.tiny, out=out).sqrt_()
    return torch.sqrt(v, out=out)
