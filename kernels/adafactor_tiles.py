"""Where an AdaFactor tile program finds its data (``kernels/adafactor.py``): the meta-table columns
and FSDP2 shard-descriptor entries, a band's and a sub-tile's geometry, a sharded sum's exchange
slot, and the fixed-order sums of partials that make every reduction deterministic."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _launcher

# meta columns (``_launcher.TILE_META``, then ours)
_SLICES = tl.constexpr(_launcher.TILE_META.index("slices"))
_ROWS = tl.constexpr(_launcher.TILE_META.index("rows"))
_COLS = tl.constexpr(_launcher.TILE_META.index("cols"))
_TILES_R = tl.constexpr(_launcher.TILE_META.index("tiles_r"))
_TILES_C = tl.constexpr(_launcher.TILE_META.index("tiles_c"))
_FIRST = tl.constexpr(_launcher.TILE_META.index("first"))
_TILES = tl.constexpr(_launcher.TILE_META.index("tiles"))
_FACTORED = tl.constexpr(_launcher.META_USER)
# two columns: the ChildTuning mask descriptor (stream, D-mask address) of ``_mask.load_grad``
_MASK = tl.constexpr(_launcher.META_USER + 1)
# 0 for a whole tensor, else the address of the FSDP2 shard's int64 descriptor (entries below)
_SHARD = tl.constexpr(_launcher.META_USER + 3)
_OFF_RC = tl.constexpr(_launcher.META_USER + 4)
_OFF_RB = tl.constexpr(_launcher.META_USER + 5)
# descriptor entries: the exchange-buffer slots (-1: none) of the column sums and Σ R of a matrix
# whose rows are split across ranks and of [Σθ², ΣU²], then the global row and element counts
_X_COLS, _X_RBAR, _X_SUMS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_G_ROWS, _G_NUMEL = tl.constexpr(3), tl.constexpr(4)


@triton.jit
def _band(p_meta, i_s, i_r, i_c, BR: tl.constexpr, BC: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr):
    """``(n_r, n_c, o_s, o_c, c_end, n_sub)`` of band ``(i_s, i_r, i_c)`` (``BR`` rows × ``BC`` columns).

    The view's rows and columns, the slice's first element, the band's columns, one past its last
    column, and how many of its ``SR``-row sub-tiles hold rows of the view.
    """
    n_r = tl.load(p_meta + _ROWS)
    n_c = tl.load(p_meta + _COLS)
    if ALIGNED:
        # row starts stay 16-byte aligned, so rows load as 128-bit vectors
        n_c = tl.multiple_of(n_c, 16)
    o_c = i_c * BC + tl.arange(0, BC)
    n_sub = tl.minimum(n_r - i_r * BR + (SR - 1), BR) // SR
    return n_r, n_c, i_s * n_r * n_c, o_c, i_c * BC + BC, n_sub


@triton.jit
def _sub(o_s, n, n_r, n_c, r0, o_c, c_end, SR: tl.constexpr):
    """``(o_r [SR], o [SR, BC], m, full)`` of the sub-tile whose first row is ``r0``.

    ``m`` masks rows, columns and flat offsets past ``n`` (flat tensors viewed with padded rows);
    ``full`` means ``m`` is all true.
    """
    o_r = r0 + tl.arange(0, SR)
    o = o_s + o_r[:, None] * n_c + o_c[None, :]
    m = (o_r[:, None] < n_r) & (o_c[None, :] < n_c) & (o < n)
    # the sub-tile's last element: flat views end inside their padded last row
    full = (r0 + SR <= n_r) & (c_end <= n_c) & (o_s + (r0 + SR - 1) * n_c + c_end <= n)
    return o_r, o, m, full


@triton.jit
def _slot(p_meta, X: tl.constexpr):
    """``(o_x, p_d)``: entry ``X`` of the tensor's shard descriptor ``p_d`` (-1 for a whole tensor)."""
    addr = tl.load(p_meta + _SHARD)
    p_d = addr.to(tl.pointer_type(tl.int64))
    return tl.load(p_d + X, mask=addr != 0, other=-1), p_d


@triton.jit
def _completed(p_meta, X: tl.constexpr, G: tl.constexpr, p_x, p_own, n_own, count_own):
    """``(p, n_parts, count)`` of a sum to finish: this rank's ``n_own`` partials at ``p_own`` over
    ``count_own`` elements or, when the tensor is an FSDP2 shard with slot ``X``, the slot in ``p_x``,
    one partial already summed over every rank, and the global count ``G``."""
    o_x, p_d = _slot(p_meta, X)
    sharded = o_x >= 0
    p = tl.where(sharded, p_x + o_x, p_own)
    return p, tl.where(sharded, 1, n_own), tl.where(sharded, tl.load(p_d + G, mask=sharded, other=0), count_own)


@triton.jit
def _sum_parts(p_part, o_v, m_v, n_parts, stride, KP: tl.constexpr, BV: tl.constexpr):
    # n_parts partial vectors (stride apart) summed KP at a time in a fixed order
    o_k = tl.arange(0, KP)
    b_acc = tl.zeros([KP, BV], tl.float32)
    for k in range(0, n_parts, KP):
        o_kk = k + o_k
        b_acc += tl.load(p_part + o_kk[:, None] * stride + o_v[None, :],
                         mask=(o_kk[:, None] < n_parts) & m_v[None, :], other=0.0)
    return tl.sum(b_acc, axis=0)


@triton.jit
def _pair_sum(p_a, p_b, n_parts, BV: tl.constexpr):
    # (Σ a, Σ b) of two [n_parts] partial vectors, BV at a time in a fixed order
    b_a = tl.zeros([BV], tl.float32)
    b_b = tl.zeros([BV], tl.float32)
    for k in range(0, n_parts, BV):
        o_k = k + tl.arange(0, BV)
        b_a += tl.load(p_a + o_k, mask=o_k < n_parts, other=0.0)
        b_b += tl.load(p_b + o_k, mask=o_k < n_parts, other=0.0)
    return tl.sum(b_a), tl.sum(b_b)


@triton.jit
def _vec_sum(p_part, n_parts, BV: tl.constexpr):
    # Σ of [n_parts] partials, BV at a time in a fixed order
    b_acc = tl.zeros([BV], tl.float32)
    for k in range(0, n_parts, BV):
        o_k = k + tl.arange(0, BV)
        b_acc += tl.load(p_part + o_k, mask=o_k < n_parts, other=0.0)
    return tl.sum(b_acc)
