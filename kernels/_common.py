"""``@triton.jit`` helpers shared by the kernels: block coordinates, table pointers, fp32 I/O."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_coords(numels, block_tensor, block_chunk, BLOCK: tl.constexpr):
    """``(i_t, o_start, n)``: this program's tensor, its first element (int64) and the tensor size."""
    pid = tl.program_id(0)
    i_t = tl.load(block_tensor + pid)
    o_start = tl.load(block_chunk + pid).to(tl.int64) * BLOCK
    n = tl.load(numels + i_t)
    return i_t, o_start, n


@triton.jit
def table_ptr(tables, i_t, k: tl.constexpr, L: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to tensor ``i_t`` of list ``k``, typed ``DTYPE``.

    A pointer loaded from memory loses the 16-byte alignment Triton assumes for kernel arguments;
    the host checked alignment, so restoring the hint keeps 128-bit vector loads.
    """
    p = tl.load(tables + i_t * L + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load_f32(p, o, m, MASKED: tl.constexpr):
    """Load and up-cast to fp32; unmasked on full blocks so loads vectorise."""
    if MASKED:
        x = tl.load(p + o, mask=m, other=0.0)
    else:
        x = tl.load(p + o)
    return x.to(tl.float32)


@triton.jit
def round_to_bf16(x):
    """fp32 → bf16 with round-to-nearest-even done on the bits.

    Spelled out so every backend rounds the same way: Triton's CPU interpreter truncates a plain
    ``.to(tl.bfloat16)``. NaN stays NaN (the carry could otherwise turn a NaN payload into inf).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), y)


@triton.jit
def store_cast(p, o, x, m, MASKED: tl.constexpr):
    """Round ``x`` once (to nearest even) to the pointer's element type and store it."""
    if p.dtype.element_ty == tl.bfloat16:
        x = round_to_bf16(x)
    else:
        x = x.to(p.dtype.element_ty)
    if MASKED:
        tl.store(p + o, x, mask=m)
    else:
        tl.store(p + o, x)
