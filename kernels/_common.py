"""``@triton.jit`` helpers shared by the kernels: block and tile coordinates, table pointers, fp32 I/O,
NaN-keeping min and max."""

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
def nan_max(x, y):
    """Elementwise maximum that keeps NaN, as ``torch.maximum`` and ``clamp`` do (``tl.maximum``
    compiles to PTX ``max.f32``, which returns the other operand of a NaN)."""
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_min(x, y):
    """Elementwise minimum that keeps NaN (see :func:`nan_max`)."""
    return tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)


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
    _store(p, o, x, m, MASKED)


@triton.jit
def _store(p, o, x, m, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p + o, x, mask=m)
    else:
        tl.store(p + o, x)


@triton.jit
def tile_coords(block_tensor, block_chunk, meta, NMETA: tl.constexpr):
    """``(i_t, p_meta, i_s, i_r, i_c)`` of a tile program (``_launcher.TilePlan``).

    The tensor, a pointer to its meta row (columns ``_launcher.TILE_META``), and the slice, tile
    row and tile column this program owns; all indices int64.
    """
    pid = tl.program_id(0)
    i_t = tl.load(block_tensor + pid).to(tl.int64)
    p_meta = meta + i_t * NMETA
    k = tl.load(block_chunk + pid).to(tl.int64)
    # meta columns 3, 4: tiles_r, tiles_c
    t_r = tl.load(p_meta + 3)
    t_c = tl.load(p_meta + 4)
    i_s = k // (t_r * t_c)
    k = k - i_s * (t_r * t_c)
    i_r = k // t_c
    return i_t, p_meta, i_s, i_r, k - i_r * t_c


@triton.jit
def tile_offsets(p_meta, n, i_s, i_r, i_c, BR: tl.constexpr, BC: tl.constexpr, ALIGNED: tl.constexpr):
    """``(o_r [BR], o_c [BC], o [BR, BC], m [BR, BC], full, n_r, n_c)`` of tile ``(i_s, i_r, i_c)``.

    ``o`` is the flat offset in the ``[slices, rows, cols]`` view, ``m`` masks rows, columns and
    flat offsets past ``n`` (flat tensors viewed with padded rows); ``full`` means ``m`` is all true;
    ``n_r``, ``n_c`` are the view's rows and columns.
    """
    # meta columns 1, 2: rows, cols
    n_r = tl.load(p_meta + 1)
    n_c = tl.load(p_meta + 2)
    if ALIGNED:
        # row starts stay 16-byte aligned, so rows load as 128-bit vectors
        n_c = tl.multiple_of(n_c, 16)
    o_r = i_r * BR + tl.arange(0, BR)
    o_c = i_c * BC + tl.arange(0, BC)
    o_s = i_s * n_r * n_c
    o = o_s + o_r[:, None] * n_c + o_c[None, :]
    m = (o_r[:, None] < n_r) & (o_c[None, :] < n_c) & (o < n)
    # the tile's last element: flat views end inside their padded last row
    o_last = o_s + (i_r * BR + BR - 1) * n_c + i_c * BC + BC - 1
    full = (i_r * BR + BR <= n_r) & (i_c * BC + BC <= n_c) & (o_last < n)
    return o_r, o_c, o, m, full, n_r, n_c


@triton.jit
def mix32(x):
    """The lowbias32 integer hash of uint32 ``x`` (``optimfx._precision.mix32`` is the reference)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def round_to_bf16_stochastic(x, o, key):
    """fp32 → bf16 rounded up with probability equal to the discarded fraction (unbiased).

    ``o`` is the element's int64 row-major index and ``key`` the step key
    (``optimfx._precision.round_key``); the same bits as ``optimfx._precision.stochastic_round_bf16``.
    """
    bits = x.to(tl.uint32, bitcast=True)
    h = mix32(o.to(tl.uint32) ^ key.to(tl.uint32))
    r = mix32(h ^ (o >> 32).to(tl.uint32) ^ ((bits >> 16) << 16)) >> 16
    y = ((bits + r) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), y)


@triton.jit
def store_cast_stochastic(p, o, x, m, key, MASKED: tl.constexpr):
    """:func:`store_cast`, with stochastic rounding (key ``key``) when the pointer is bf16."""
    if p.dtype.element_ty == tl.bfloat16:
        x = round_to_bf16_stochastic(x, o, key)
    else:
        x = x.to(p.dtype.element_ty)
    _store(p, o, x, m, MASKED)
