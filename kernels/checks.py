"""Device-side gradient checks that feed a skip flag to the update kernels (no host sync).

The flag is an int32 device tensor, non-zero when the step must be skipped: a gradient holds inf or
NaN, or ``torch.amp.GradScaler`` reported ``found_inf``. With a GradScaler ``grad_scale`` the
gradients are also unscaled, into private fp32 copies (``p.grad`` is never written), in the same
pass that checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launcher
from ._common import block_coords, load_f32, store_cast, table_ptr

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def nonfinite(b_g):
    """1 where ``b_g`` is inf or NaN, else 0 (int32, the shape of ``b_g``)."""
    return ((b_g != b_g) | (tl.abs(b_g) == float("inf"))).to(tl.int32)


@triton.jit
def raise_flag(flag_ptr, b_bad):
    """Set ``*flag_ptr`` to 1 when an element of the 1-D int32 block ``b_bad`` is non-zero."""
    # an integer max (not a float atomic) keeps the flag deterministic
    bad = tl.max(b_bad, axis=0)
    if bad != 0:
        tl.atomic_max(flag_ptr, bad)


@triton.jit
def raise_flag_if_nonfinite(flag_ptr, b_g):
    """Set ``*flag_ptr`` to 1 when a value of the 1-D block ``b_g`` is inf or NaN."""
    raise_flag(flag_ptr, nonfinite(b_g))


@triton.jit
def nonfinite_flag_kernel(tables, numels, block_tensor, block_chunk, flag_ptr,
                          DTYPE0: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    i_t, o_start, n = block_coords(numels, block_tensor, block_chunk, BLOCK)
    p_g = table_ptr(tables, i_t, 0, 1, DTYPE0, ALIGNED)
    o = o_start + tl.arange(0, BLOCK)
    raise_flag_if_nonfinite(flag_ptr, load_f32(p_g, o, o < n, True))


@triton.jit
def unscale_kernel(tables, numels, block_tensor, block_chunk, flag_ptr, inv_scale_ptr,
                   DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, CHECK: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # lists: 0 scaled gradient (read), 1 its fp32 unscaled copy (written); skipped steps write nothing
    if tl.load(flag_ptr) != 0:
        return
    i_t, o_start, n = block_coords(numels, block_tensor, block_chunk, BLOCK)
    p_g = table_ptr(tables, i_t, 0, 2, DTYPE0, ALIGNED)
    p_u = table_ptr(tables, i_t, 1, 2, DTYPE1, ALIGNED)
    o = o_start + tl.arange(0, BLOCK)
    m = o < n
    b_g = load_f32(p_g, o, m, True) * tl.load(inv_scale_ptr)
    if CHECK:
        raise_flag_if_nonfinite(flag_ptr, b_g)
    store_cast(p_u, o, b_g, m, True)


def nonfinite_flag(grads: list[torch.Tensor], found_inf: torch.Tensor | None = None,
                   check: bool = True) -> torch.Tensor:
    """An int32 device tensor ``[1]``, non-zero once ``found_inf`` is non-zero or (with ``check``) any
    gradient holds inf or NaN; set asynchronously."""
    device = grads[0].device
    if found_inf is None:
        flag = torch.zeros(1, dtype=torch.int32, device=device)
    else:
        flag = (found_inf.detach().reshape(1).to(device, non_blocking=True) != 0).to(torch.int32)
    if check:
        raise_if_nonfinite(grads, flag)
    return flag


def raise_if_nonfinite(grads: list[torch.Tensor], flag: torch.Tensor) -> None:
    """Raise ``flag`` (set it non-zero, asynchronously) when a gradient holds inf or NaN."""
    _launcher.launch(nonfinite_flag_kernel, [_launcher.contiguous_list(grads)], flag, block=BLOCK,
                     num_warps=NUM_WARPS)


def unscaled(grads: list[torch.Tensor], grad_scale: torch.Tensor, flag: torch.Tensor,
             check: bool) -> list[torch.Tensor]:
    """fp32 copies of ``grads`` times ``1 / grad_scale`` (read on the device), for one step.

    ``1 / grad_scale`` is rounded to fp32 as ``GradScaler.unscale_`` does, so for fp32 gradients the
    copies hold the bits GradScaler's own unscale would write. With ``check``, an unscaled value that is
    inf or NaN raises ``flag``; when ``flag`` is already raised nothing is written (the step is skipped).
    """
    device = grads[0].device
    inv_scale = grad_scale.detach().reshape(1).to(device, torch.float64, non_blocking=True)
    inv_scale = inv_scale.reciprocal().to(torch.float32)
    grads = _launcher.contiguous_list(grads)
    copies = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in grads]
    _launcher.launch(unscale_kernel, [grads, copies], flag, inv_scale, block=BLOCK, num_warps=NUM_WARPS,
                     CHECK=check)
    return copies
