r"""AdaFactor: the exact three-reduction algorithm (spec §1.1) in five launches per tensor group.

Every tensor is a ``[slices, rows, cols]`` view (``_launcher.TilePlan``): factored tensors view their
last two axes, each leading index a slice; unfactored ones are flat, ``(1, ceil(n / BC), BC)``. A tile
program owns a band of ``RB`` rows × ``BC`` columns and walks it in sub-tiles of up to ``BR × BC``
(64 KB of fp32 per stream per program: the block-map and meta-table look-ups are paid once per band,
and every warp loads whole 512-byte row segments). All five passes run over all tensors of a group,
one launch each::

    rowcol (bands)  : Σθ² per band; factored: row sums of g² per column tile (one per sub-tile
                      row) and column sums per band                                        → scratch
    stats  (bands)  : the programs of a slice share out its row jobs (RJ rows) and column jobs (CB
                      columns); each sums its partials as [K, V] blocks in a fixed order,
                      R ← lerp(R, Σ/n_c + ε1, w), C likewise; Σ R per row job            → scratch
    rms    (bands)  : R̄ per slice; ΣU² per band (unfactored: V ← (1 − w)·V + w·(g² + ε1) here)
    scale  (tensors): α = min(lr·ρ, cap)·max(ε2, RMS θ), κ = max(1, RMS U / d) → α/κ and decay
    apply  (bands)  : U recomputed, M ← β1·M + (1 − β1)·(α/κ)·U, θ ← θ·decay − (M or (α/κ)·U)

The finishing work is spread over many programs and read as wide blocks: a column of an
``n_r``-row matrix has ``n_r / RB`` partials, a slice ``n_r / RJ`` R̄ partials and a tensor
``numel / (RB·BC)`` Σθ², ΣU² partials (488 160 × 512: 3 814, 477 and 15 256), so no program runs a
long serial chain of dependent loads, and R̄, which every rms program recomputes, costs a 2 KB read.

The rowcol, rms and apply passes load g through ``_mask.load_grad``: a ChildTuning-F mask is a hash of
the element index, so the three passes see the same masked gradient without storing it.
Reductions are two-stage (partials at fixed scratch slots, summed in a fixed order): no float
atomics, bit-identical reruns. ``lr`` and the skip flag are read from device memory; no host sync.
Traffic per fp32 element (factored, no momentum): θ + g, g, θ + g + θ written = 24 bytes, plus
~0.2 bytes of partials written and read back.

FSDP2 shards take the same passes on their local shards, with their sums completed across ranks
between passes (``kernels/adafactor_shards.py``): the stats, rms and scale passes read a sharded
tensor's completed sums from its slot of an exchange buffer (meta column ``_SHARD``, 0 for whole
tensors).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
import triton
import triton.language as tl

from .. import _distributed
from ..reference.adafactor import _eps1
from . import _launcher, _mask, checks
from .checks import nonfinite, raise_flag
from ._common import load_f32, store_cast, store_cast_stochastic, table_ptr, tile_coords

if TYPE_CHECKING:
    from .adafactor_shards import _Exchange

# a band program owns RB rows × BC columns (64 KB of fp32 per stream) and walks them in sub-tiles of
# SUB[pass] = (rows, warps), 8 fp32 elements per thread and stream each step; BR × BC is the apply
# pass's sub-tile. With the register cap, 32 warps fit on an SM (eight 4-warp or two 16-warp
# programs): 64 KB of loads in flight per SM, no spill in the unmasked passes on sm_90 beyond
# 8 bytes in rowcol (0 disables the cap; the interpreter ignores it). Measured on an H100 at 500 M
# parameters (ms): rowcol 1.35 / 1.40 / 1.59 / 2.26 with (8, 4) / (16, 8) / (32, 16) capped /
# (32, 16) uncapped (76-108 registers, one program per SM), rms 0.67 / 0.71 / 0.83 / 1.36, apply
# 2.01 / 2.03 / 2.01 / 2.37
BR, BC = 32, 128
RB = 4 * BR
SUB = {"rowcol": (BR // 4, 4), "rms": (BR // 4, 4), "apply": (BR, 16)}
MAX_REGS = 64
#: the rowcol pass can check the gradients for inf/NaN as it reads them (``launch(scan_nonfinite=True)``)
SCANS_NONFINITE = True
# stats: a row job finishes RJ rows from [KR, VR] blocks of row partials, a column job CB columns
# from [KC, CB] blocks of column partials (CB·4 = 128 bytes: one cache line per partial row)
RJ, KR, VR = 1024, 8, 512
KC, CB = 128, 32
STATS_WARPS = 8
# the scale pass and R̄ read their partials as [VB] vectors
VB = 1024
SMALL_WARPS = 4
_TINY = torch.finfo(torch.float32).tiny
_lr_cache: dict = {}

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
def _lerp(b_old, b_new, weight):
    # torch.lerp's two-sided form: weight = 1 (step 1) gives b_new exactly
    return tl.where(weight < 0.5, b_old + weight * (b_new - b_old), b_new - (b_new - b_old) * (1.0 - weight))


@triton.jit
def _col_term(b_col, tiny, EPS_TORCH: tl.constexpr):
    # the column factor of U, formed once per band: C_j (torch mode) or rsqrt(C_j) (paper)
    if EPS_TORCH:
        b_cf = b_col
    else:
        # C_j ≥ ε1 unless ε1 < tiny (then a zero column stays a zero update, as in the reference)
        b_cf = tl.rsqrt(tl.maximum(b_col, tiny))
    return b_cf


@triton.jit
def _factored_u(b_g, b_row, b_cf, rbar, floor1, floor2, tiny, EPS_TORCH: tl.constexpr):
    if EPS_TORCH:
        # torch.optim.Adafactor: U = g / sqrt(max(R_i·C_j / max(R̄, ε1), ε1²)), floors kept > 0
        # (R_i / R̄ first: the product R_i·C_j alone overflows fp32 for gradients of ~1e10)
        b_v = (b_row / tl.maximum(rbar, floor1))[:, None] * b_cf[None, :]
        b_u = tl.rsqrt(tl.maximum(b_v, floor2)) * b_g
    else:
        # paper: U = g·rsqrt(R_i / R̄)·rsqrt(C_j), V̂ never formed; R̄/R_i capped at 1/tiny as in the
        # reference, so a zero row (ε1 < tiny) stays a zero update
        b_rf = tl.rsqrt(tl.maximum(b_row / tl.maximum(rbar, tiny), tiny))
        b_u = b_g * b_rf[:, None] * b_cf[None, :]
    return b_u


@triton.jit
def _unfactored_u(b_g, b_v, floor2, tiny, EPS_TORCH: tl.constexpr):
    if EPS_TORCH:
        b_u = tl.rsqrt(tl.maximum(b_v, floor2)) * b_g
    else:
        # V ≥ ε1 unless ε1 < tiny (then a zero entry stays a zero update, as in the reference)
        b_u = tl.rsqrt(tl.maximum(b_v, tiny)) * b_g
    return b_u


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
def _rowcol_sub(p_p, p_g, p_d, p_row, o, o_r, m, n_r, b_pp, b_cc, factored, flag_ptr, mask_seed, mask_step,
                mask_threshold, mask_scale, MASK_MODE: tl.constexpr, SCAN: tl.constexpr, MASKED: tl.constexpr):
    b_p = load_f32(p_p, o, m, MASKED)
    b_pp += b_p * b_p
    if SCAN or factored:
        b_g = _mask.load_grad(p_g, p_d, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED, MASK_MODE)
        if SCAN:
            # a mask multiplies by a finite factor: the masked gradient is non-finite where g is
            raise_flag(flag_ptr, tl.max(nonfinite(b_g), axis=1))
        if factored:
            b_g = b_g * b_g
            # [SR] row partials of this column tile; the column sums add up over the band
            tl.store(p_row + o_r, tl.sum(b_g, axis=1), mask=o_r < n_r)
            b_cc += b_g
    return b_pp, b_cc


@triton.jit(do_not_specialize=["mask_step"])
def adafactor_rowcol_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_sqp, p_rc,
                            mask_seed, mask_step, mask_threshold, mask_scale,
                            DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                            DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, MASK_MODE: tl.constexpr,
                            CHECK_SKIP: tl.constexpr, SCAN: tl.constexpr, ALIGNED: tl.constexpr,
                            BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr, SR: tl.constexpr):
    # lists: 0 param, 1 grad, 2 row stat or V, 3 column stat or V, 4 exp_avg (or a stand-in);
    # with SCAN, every gradient is also checked and a non-finite value raises the skip flag, which
    # the later passes read (this pass writes only scratch, so a skipped step changes nothing)
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    n = tl.load(numels + i_t)
    n_r, n_c, o_s, o_c, c_end, n_sub = _band(p_meta, i_s, i_r, i_c, BR, BC, SR, ALIGNED)
    t_r, t_c = tl.load(p_meta + _TILES_R), tl.load(p_meta + _TILES_C)
    # row partials [slices, tiles_c, rows], then column partials [slices, tiles_r, cols]
    p_rc = p_rc + tl.load(p_meta + _OFF_RC)
    p_row = p_rc + (i_s * t_c + i_c) * n_r
    p_col = p_rc + tl.load(p_meta + _SLICES) * t_c * n_r + (i_s * t_r + i_r) * n_c
    p_p = table_ptr(tables, i_t, 0, 5, DTYPE0, ALIGNED)
    p_g = table_ptr(tables, i_t, 1, 5, DTYPE1, ALIGNED)
    factored = tl.load(p_meta + _FACTORED) != 0
    b_pp = tl.zeros([SR, BC], tl.float32)
    b_cc = tl.zeros([SR, BC], tl.float32)
    for j in range(n_sub):
        o_r, o, m, full = _sub(o_s, n, n_r, n_c, i_r * BR + j * SR, o_c, c_end, SR)
        if full:
            b_pp, b_cc = _rowcol_sub(p_p, p_g, p_meta + _MASK, p_row, o, o_r, m, n_r, b_pp, b_cc, factored,
                                     skip_ptr, mask_seed, mask_step, mask_threshold, mask_scale, MASK_MODE,
                                     SCAN, False)
        else:
            b_pp, b_cc = _rowcol_sub(p_p, p_g, p_meta + _MASK, p_row, o, o_r, m, n_r, b_pp, b_cc, factored,
                                     skip_ptr, mask_seed, mask_step, mask_threshold, mask_scale, MASK_MODE,
                                     SCAN, True)
    tl.store(p_sqp + tl.program_id(0), tl.sum(b_pp))
    if factored:
        tl.store(p_col + o_c, tl.sum(b_cc, axis=0), mask=o_c < n_c)


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
def _finish_stat(p_part, p_stat, o_v, m_v, n_parts, stride, count, weight, eps_add, KP: tl.constexpr,
                 BV: tl.constexpr):
    # the EMA of the mean of n_parts partial vectors; returns the new values (0 where masked)
    b_s = tl.load(p_stat + o_v, mask=m_v, other=0.0)
    b_s = _lerp(b_s, _sum_parts(p_part, o_v, m_v, n_parts, stride, KP, BV) / count.to(tl.float32) + eps_add,
                weight)
    tl.store(p_stat + o_v, b_s, mask=m_v)
    return tl.where(m_v, b_s, 0.0)


@triton.jit
def adafactor_stats_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rc, p_rb, p_x,
                           weight, eps_add,
                           DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                           DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, CHECK_SKIP: tl.constexpr,
                           ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr,
                           RJ: tl.constexpr, KR: tl.constexpr, VR: tl.constexpr, KC: tl.constexpr,
                           CB: tl.constexpr):
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    if tl.load(p_meta + _FACTORED) != 0:
        n_r, n_c = tl.load(p_meta + _ROWS), tl.load(p_meta + _COLS)
        t_r, t_c = tl.load(p_meta + _TILES_R), tl.load(p_meta + _TILES_C)
        p_rc = p_rc + tl.load(p_meta + _OFF_RC)
        # the slice's t_r·t_c programs share its jobs out round-robin: row jobs from the first
        # program up, column jobs from the last one down
        q = i_r * t_c + i_c
        n_prog = t_r * t_c
        # row jobs: R ← lerp(R, mean_j g² + ε1, w) for RJ rows; Σ R over them → R̄ partial
        n_jr = (n_r + RJ - 1) // RJ
        p_row = table_ptr(tables, i_t, 2, 5, DTYPE2, False) + i_s * n_r
        p_rpart = p_rc + i_s * t_c * n_r
        p_rbar = p_rb + tl.load(p_meta + _OFF_RB) + i_s * n_jr
        for j in range(q, n_jr, n_prog):
            b_tot = tl.zeros([VR], tl.float32)
            for r in range(j * RJ, tl.minimum(j * RJ + RJ, n_r), VR):
                o_v = r + tl.arange(0, VR)
                b_tot += _finish_stat(p_rpart, p_row, o_v, o_v < n_r, t_c, n_r, n_c, weight, eps_add, KR, VR)
            tl.store(p_rbar + j, tl.sum(b_tot))
        # column jobs: C ← lerp(C, mean_i g² + ε1, w) for CB columns (rows split across ranks: from
        # the column sums over every rank's rows)
        n_jc = (n_c + CB - 1) // CB
        p_col = table_ptr(tables, i_t, 3, 5, DTYPE3, False) + i_s * n_c
        p_cpart, n_cparts, n_rows = _completed(p_meta, _X_COLS, _G_ROWS, p_x,
                                               p_rc + tl.load(p_meta + _SLICES) * t_c * n_r + i_s * t_r * n_c,
                                               t_r, n_r)
        for j in range(n_prog - 1 - q, n_jc, n_prog):
            o_v = j * CB + tl.arange(0, CB)
            _finish_stat(p_cpart, p_col, o_v, o_v < n_c, n_cparts, n_c, n_rows, weight, eps_add, KC, CB)


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


@triton.jit
def _rms_sub(p_g, p_d, p_a, p_row, o, o_r, m, n_r, b_cf, b_uu, rbar, factored, sign, weight, omw, w_eps,
             floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale, EPS_TORCH: tl.constexpr,
             MASK_MODE: tl.constexpr, MASKED: tl.constexpr):
    b_g = _mask.load_grad(p_g, p_d, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED, MASK_MODE) * sign
    if factored:
        b_row = tl.load(p_row + o_r, mask=o_r < n_r, other=1.0)
        b_u = _factored_u(b_g, b_row, b_cf, rbar, floor1, floor2, tiny, EPS_TORCH)
    else:
        b_v = load_f32(p_a, o, m, MASKED)
        if EPS_TORCH:
            b_v = _lerp(b_v, b_g * b_g, weight)
        else:
            b_v = b_v * omw + weight * b_g * b_g + w_eps
        store_cast(p_a, o, b_v, m, MASKED)
        b_u = _unfactored_u(b_g, b_v, floor2, tiny, EPS_TORCH)
    if MASKED:
        b_u = tl.where(m, b_u, 0.0)
    return b_uu + b_u * b_u


@triton.jit(do_not_specialize=["mask_step"])
def adafactor_rms_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rb, p_squ, p_x,
                         sign, weight, omw, w_eps, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale,
                         DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                         DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, EPS_TORCH: tl.constexpr,
                         MASK_MODE: tl.constexpr,
                         CHECK_SKIP: tl.constexpr, ALIGNED: tl.constexpr, BR: tl.constexpr,
                         BC: tl.constexpr, NMETA: tl.constexpr, SR: tl.constexpr, RJ: tl.constexpr,
                         VB: tl.constexpr):
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    n = tl.load(numels + i_t)
    n_r, n_c, o_s, o_c, c_end, n_sub = _band(p_meta, i_s, i_r, i_c, BR, BC, SR, ALIGNED)
    factored = tl.load(p_meta + _FACTORED) != 0
    p_g = table_ptr(tables, i_t, 1, 5, DTYPE1, ALIGNED)
    p_a = table_ptr(tables, i_t, 2, 5, DTYPE2, ALIGNED)
    p_b = table_ptr(tables, i_t, 3, 5, DTYPE3, ALIGNED)
    rbar = tl.full([], 1.0, tl.float32)
    b_cf = tl.full([BC], 1.0, tl.float32)
    if factored:
        n_jr = (n_r + RJ - 1) // RJ
        p_rb = p_rb + tl.load(p_meta + _OFF_RB)
        # R̄ of the slice from its [n_jr] partials (rows split across ranks: Σ R over every rank)
        p_part, n_parts, n_rows = _completed(p_meta, _X_RBAR, _G_ROWS, p_x, p_rb + i_s * n_jr, n_jr, n_r)
        rbar = _vec_sum(p_part, n_parts, VB) / n_rows.to(tl.float32)
        if (i_r == 0) & (i_c == 0):
            # R̄ of the slice for the apply pass, after the [slices, row jobs] partials
            tl.store(p_rb + tl.load(p_meta + _SLICES) * n_jr + i_s, rbar)
        b_cf = _col_term(tl.load(p_b + i_s * n_c + o_c, mask=o_c < n_c, other=1.0), tiny, EPS_TORCH)
    p_row = p_a + i_s * n_r
    b_uu = tl.zeros([SR, BC], tl.float32)
    for j in range(n_sub):
        o_r, o, m, full = _sub(o_s, n, n_r, n_c, i_r * BR + j * SR, o_c, c_end, SR)
        if full:
            b_uu = _rms_sub(p_g, p_meta + _MASK, p_a, p_row, o, o_r, m, n_r, b_cf, b_uu, rbar, factored, sign,
                            weight, omw, w_eps, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold,
                            mask_scale, EPS_TORCH, MASK_MODE, False)
        else:
            b_uu = _rms_sub(p_g, p_meta + _MASK, p_a, p_row, o, o_r, m, n_r, b_cf, b_uu, rbar, factored, sign,
                            weight, omw, w_eps, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold,
                            mask_scale, EPS_TORCH, MASK_MODE, True)
    tl.store(p_squ + tl.program_id(0), tl.sum(b_uu))


@triton.jit
def adafactor_scale_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, lr_ptr, p_sqp,
                           p_squ, p_x, p_scale, rho, cap, eps2, use_scale, clip, wd_alpha, wd_lr,
                           DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                           DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, CHECK_SKIP: tl.constexpr,
                           ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr,
                           VB: tl.constexpr):
    # one program per tensor, over its per-band partials (15 256 for a 488 160 × 512 matrix)
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t = tl.program_id(0).to(tl.int64)
    p_meta = meta + i_t * NMETA
    first, tiles = tl.load(p_meta + _FIRST), tl.load(p_meta + _TILES)
    # Σθ², ΣU² from the band partials (an FSDP2 shard: its slot [Σθ², ΣU²], over every rank)
    n = tl.load(numels + i_t)
    p_p, n_parts, n = _completed(p_meta, _X_SUMS, _G_NUMEL, p_x, p_sqp + first, tiles, n)
    p_u, n_parts, n = _completed(p_meta, _X_SUMS, _G_NUMEL, p_x + 1, p_squ + first, tiles, n)
    s_p, s_u = _pair_sum(p_p, p_u, n_parts, VB)
    n = n.to(tl.float32)
    lr = tl.load(lr_ptr)
    # α = ρ·max(ε2, RMS θ) (ρ = min(lr·ρ_t, cap)); the update is α/κ with κ = max(1, RMS U / d)
    alpha = tl.minimum(lr * rho, cap)
    alpha = alpha * tl.where(use_scale != 0.0, tl.maximum(tl.sqrt(s_p / n), eps2), 1.0)
    kappa = tl.maximum(tl.sqrt(s_u / n) / clip, 1.0)
    tl.store(p_scale + 2 * i_t, alpha / kappa)
    tl.store(p_scale + 2 * i_t + 1, 1.0 - (wd_alpha * alpha + wd_lr * lr))


@triton.jit
def _apply_sub(p_p, p_g, p_d, p_a, p_row, p_m, o, o_r, m, n_r, b_cf, rbar, factored, scale, decay,
               sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale,
               round_key, EPS_TORCH: tl.constexpr, MOMENTUM: tl.constexpr, MASK_MODE: tl.constexpr,
               STOCHASTIC: tl.constexpr, MASKED: tl.constexpr):
    b_g = _mask.load_grad(p_g, p_d, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED, MASK_MODE) * sign
    if factored:
        b_row = tl.load(p_row + o_r, mask=o_r < n_r, other=1.0)
        b_u = _factored_u(b_g, b_row, b_cf, rbar, floor1, floor2, tiny, EPS_TORCH)
    else:
        # V was updated by the rms pass; masked lanes read 1 so rsqrt stays finite there
        b_v = load_f32(p_a, o, m, MASKED)
        if MASKED:
            b_v = tl.where(m, b_v, 1.0)
        b_u = _unfactored_u(b_g, b_v, floor2, tiny, EPS_TORCH)
    b_p = load_f32(p_p, o, m, MASKED)
    if MOMENTUM:
        b_m = load_f32(p_m, o, m, MASKED)
        b_m = b_m * beta1 + omb1 * b_u * scale
        store_cast(p_m, o, b_m, m, MASKED)
        b_p = b_p * decay - b_m
    else:
        b_p = b_p * decay - b_u * scale
    if STOCHASTIC:
        store_cast_stochastic(p_p, o, b_p, m, round_key, MASKED)
    else:
        store_cast(p_p, o, b_p, m, MASKED)


@triton.jit(do_not_specialize=["mask_step"])
def adafactor_apply_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rb, p_scale,
                           sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale,
                           round_key, DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                           DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, EPS_TORCH: tl.constexpr,
                           MOMENTUM: tl.constexpr, MASK_MODE: tl.constexpr, STOCHASTIC: tl.constexpr,
                           CHECK_SKIP: tl.constexpr,
                           ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr,
                           SR: tl.constexpr, RJ: tl.constexpr):
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    n = tl.load(numels + i_t)
    n_r, n_c, o_s, o_c, c_end, n_sub = _band(p_meta, i_s, i_r, i_c, BR, BC, SR, ALIGNED)
    factored = tl.load(p_meta + _FACTORED) != 0
    scale, decay = tl.load(p_scale + 2 * i_t), tl.load(p_scale + 2 * i_t + 1)
    p_p = table_ptr(tables, i_t, 0, 5, DTYPE0, ALIGNED)
    p_g = table_ptr(tables, i_t, 1, 5, DTYPE1, ALIGNED)
    p_a = table_ptr(tables, i_t, 2, 5, DTYPE2, ALIGNED)
    p_b = table_ptr(tables, i_t, 3, 5, DTYPE3, ALIGNED)
    if MOMENTUM:
        p_m = table_ptr(tables, i_t, 4, 5, DTYPE4, ALIGNED)
    else:
        p_m = p_g
    rbar = tl.full([], 1.0, tl.float32)
    b_cf = tl.full([BC], 1.0, tl.float32)
    if factored:
        n_jr = (n_r + RJ - 1) // RJ
        rbar = tl.load(p_rb + tl.load(p_meta + _OFF_RB) + tl.load(p_meta + _SLICES) * n_jr + i_s)
        b_cf = _col_term(tl.load(p_b + i_s * n_c + o_c, mask=o_c < n_c, other=1.0), tiny, EPS_TORCH)
    p_row = p_a + i_s * n_r
    for j in range(n_sub):
        o_r, o, m, full = _sub(o_s, n, n_r, n_c, i_r * BR + j * SR, o_c, c_end, SR)
        if full:
            _apply_sub(p_p, p_g, p_meta + _MASK, p_a, p_row, p_m, o, o_r, m, n_r, b_cf, rbar, factored, scale,
                       decay, sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold,
                       mask_scale, round_key, EPS_TORCH, MOMENTUM, MASK_MODE, STOCHASTIC, False)
        else:
            _apply_sub(p_p, p_g, p_meta + _MASK, p_a, p_row, p_m, o, o_r, m, n_r, b_cf, rbar, factored, scale,
                       decay, sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold,
                       mask_scale, round_key, EPS_TORCH, MOMENTUM, MASK_MODE, STOCHASTIC, True)


def _view(t: torch.Tensor, factored: bool) -> tuple[int, int, int]:
    """``(slices, rows, cols)``: the last two axes of a factored tensor, else flat rows of ``BC``."""
    if factored:
        n_r, n_c = t.shape[-2], t.shape[-1]
        return t.numel() // max(n_r * n_c, 1), n_r, n_c
    return 1, -(-t.numel() // BC), BC


def _scratch_sizes(view: tuple[int, int, int], factored: bool) -> tuple[int, int]:
    """Row/column partials ``S·(t_c·n_r + t_r·n_c)`` (``t_r`` bands of ``RB`` rows) and R̄ partials
    plus finals ``S·(ceil(n_r / RJ) + 1)``."""
    if not factored:
        return 0, 0
    slices, n_r, n_c = view
    t_r, t_c = _launcher.tile_counts(view, (RB, BC))
    return slices * (t_c * n_r + t_r * n_c), slices * (-(-n_r // RJ) + 1)


class _Group(NamedTuple):
    """A launch group: its tile plan, ε1 and torch mode's clamp floors for its dtype, and its scratch."""

    plan: _launcher.TilePlan
    eps1: float
    floor1: float
    floor2: float
    sq_param: torch.Tensor
    sq_update: torch.Tensor
    rowcol: torch.Tensor
    row_mean: torch.Tensor
    scale: torch.Tensor


def _group(plan: _launcher.TilePlan, dtype: torch.dtype, hp: Any, tag: str) -> _Group:
    """The group of ``plan``; groups with one ``tag`` take turns with the same scratch buffers."""
    eps1 = _eps1(hp, dtype)
    device = plan.tables.device

    def scratch(name: str, numel: int) -> torch.Tensor:
        return _launcher.workspace(f"adafactor.{name}{tag}", numel, device)

    # torch mode's clamp floors ε1 (on R̄) and ε1² (on V̂, V), kept positive in fp32 as the
    # reference does (ε1² = 1e-60 would flush to 0 and a zero row give 0·rsqrt(0))
    return _Group(plan, eps1, max(eps1, _TINY), max(eps1 * eps1, _TINY), scratch("sq_param", plan.n_blocks),
                  scratch("sq_update", plan.n_blocks), scratch("rowcol", plan.segment_sizes[0]),
                  scratch("row_mean", plan.segment_sizes[1]), scratch("scale", 2 * plan.n_tensors))


class _Step:
    """One step over a list of tensors: its launch arguments, and each pass as a method that launches
    it on one group (:meth:`run` runs passes group by group).

    With ``exchange`` (FSDP2 shards) the shard descriptors point the kernels at the tensors' slots in
    the zeroed exchange buffer :attr:`x`; without it every tensor finishes its sums from its own
    partials (meta column ``_SHARD`` holds 0, and :attr:`x` is a never-read stand-in).
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], hp: Any,
                 sc: Any, lr: Any, skip_flag: torch.Tensor | None, round_key: int | None,
                 exchange: _Exchange | None = None) -> None:
        factored = ["exp_avg_sq_row" in s for s in states]
        stat_a = [s["exp_avg_sq_row"] if f else s["exp_avg_sq"] for s, f in zip(states, factored)]
        self.stat_b = [s["exp_avg_sq_col"] if f else s["exp_avg_sq"] for s, f in zip(states, factored)]
        self.params, self.hp, self.sc, self.round_key, self.exchange = params, hp, sc, round_key, exchange
        self.work = [_launcher.contiguous_or_copy(p) for p in params]
        self.grads = [_launcher.contiguous_or_copy(g) for g in grads]
        self.mask = _mask.prepare(self.grads, states, hp.mask)
        self.momentum = hp.beta1 is not None
        # without momentum list 4 is a never-read stand-in, so every kernel keeps one signature
        exp_avg = [s["exp_avg"] for s in states] if self.momentum else self.grads
        views = [_view(p, f) for p, f in zip(params, factored)]
        sizes = [_scratch_sizes(v, f) for v, f in zip(views, factored)]
        device = params[0].device
        self.lr_t = _launcher.device_scalar(lr, device, _lr_cache)
        self.flag = skip_flag if skip_flag is not None else self.lr_t
        self.check = skip_flag is not None
        self.torch_eps = hp.eps_mode == "torch"
        self.sign = -1.0 if hp.maximize else 1.0
        if hp.relative_step and hp.lr_mode == "rho_max":
            self.rho, self.cap = 1.0, sc.inv_sqrt_step
        else:
            self.rho, self.cap = sc.rho, float("inf")
        regs = {"maxnreg": MAX_REGS} if MAX_REGS else {}
        self.sub = {k: dict(SR=r, num_warps=w, **regs) for k, (r, w) in SUB.items()}
        if exchange is None:
            shards, tag, self.x = [0] * len(params), "", self.lr_t
        else:
            shards, tag = exchange.addresses(), ".shards"
            self.x = _launcher.workspace("adafactor.exchange", exchange.layout.size, device)[:exchange.layout.size]
            self.x.zero_()
        columns = [[int(f) for f in factored], *self.mask.columns, shards]
        segments = [[s[0] for s in sizes], [s[1] for s in sizes]]
        launch_groups = _launcher.tile_groups([self.work, self.grads, stat_a, self.stat_b, exp_avg], views,
                                              (RB, BC), columns, segments)
        # a sharded step runs each pass over every group before the next pass: each group keeps its
        # own scratch (whole tensors' groups take turns with one set)
        self.groups = [_group(plan, params[idx[0]].dtype, hp, f"{tag}{k}" if exchange else "")
                       for k, (idx, plan) in enumerate(launch_groups)]

    def run(self, *passes: Callable[[_Group], None]) -> None:
        """``passes`` in order on the first group, then on the next one, and so on."""
        for g in self.groups:
            for launch_pass in passes:
                launch_pass(g)

    def rowcol(self, g: _Group, scan: bool = False) -> None:
        g.plan.launch(adafactor_rowcol_kernel, self.flag, g.sq_param, g.rowcol, *self.mask.args, **self.sub["rowcol"],
                      MASK_MODE=self.mask.mode, CHECK_SKIP=self.check, SCAN=scan)

    def stats(self, g: _Group) -> None:
        g.plan.launch(adafactor_stats_kernel, self.flag, g.rowcol, g.row_mean, self.x, self.sc.weight,
                      0.0 if self.torch_eps else g.eps1, num_warps=STATS_WARPS, CHECK_SKIP=self.check, RJ=RJ,
                      KR=KR, VR=VR, KC=KC, CB=CB)

    def rms(self, g: _Group) -> None:
        w = self.sc.weight
        g.plan.launch(adafactor_rms_kernel, self.flag, g.row_mean, g.sq_update, self.x, self.sign, w, 1.0 - w,
                      w * g.eps1, g.floor1, g.floor2, _TINY, *self.mask.args, **self.sub["rms"],
                      EPS_TORCH=self.torch_eps, MASK_MODE=self.mask.mode, CHECK_SKIP=self.check, RJ=RJ, VB=VB)

    def scale(self, g: _Group) -> None:
        hp = self.hp
        hf_decay = hp.decay_mode == "hf"
        g.plan.launch(adafactor_scale_kernel, self.flag, self.lr_t, g.sq_param, g.sq_update, self.x, g.scale,
                      self.rho, self.cap, hp.eps2, float(hp.scale_parameter), hp.clip_threshold,
                      hp.weight_decay if hf_decay else 0.0, 0.0 if hf_decay else hp.weight_decay,
                      per_tensor=True, num_warps=SMALL_WARPS, CHECK_SKIP=self.check, VB=VB)

    def apply(self, g: _Group) -> None:
        beta1 = self.hp.beta1 if self.momentum else 0.0
        key = self.round_key
        g.plan.launch(adafactor_apply_kernel, self.flag, g.row_mean, g.scale, self.sign, beta1, 1.0 - beta1,
                      g.floor1, g.floor2, _TINY, *self.mask.args, 3 if key is None else key, **self.sub["apply"],
                      EPS_TORCH=self.torch_eps, MOMENTUM=self.momentum, MASK_MODE=self.mask.mode,
                      STOCHASTIC=key is not None, CHECK_SKIP=self.check, RJ=RJ)

    def write_back(self) -> None:
        for p, w in zip(self.params, self.work):
            if w is not p:
                p.copy_(w)


def launch(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]],
           hp: Any, sc: Any, lr: Any, skip_flag: torch.Tensor | None = None, scan_nonfinite: bool = False,
           round_key: int | None = None) -> None:
    """Host launcher: five launches per (device, dtype, alignment) group of tensors, whatever their number.

    ``skip_flag``, when given, is a device int32 tensor; a non-zero value makes every pass a no-op
    (parameters and all state untouched), with no host synchronisation. With ``scan_nonfinite`` the
    gradients are checked here and ``skip_flag`` raised when one holds inf or NaN: inside the rowcol
    pass, which reads them anyway, when the tensors form one launch group (so no group is written
    before every gradient has been seen), else by a separate scan first.

    ``round_key``, when given, writes bf16 parameters by stochastic rounding with that key
    (:func:`optimfx._precision.round_key`) in the apply pass.

    FSDP2 shards (a ``ShardSpec`` under ``_distributed.SHARD_KEY`` in their state) go through
    :func:`optimfx._kernels.adafactor_shards.launch_distributed`.
    """
    if any(_distributed.SHARD_KEY in s for s in states):
        from .adafactor_shards import launch_distributed

        launch_distributed(params, grads, states, hp, sc, lr, skip_flag, scan_nonfinite, round_key)
        return
    step = _Step(params, grads, states, hp, sc, lr, skip_flag, round_key)
    scan = scan_nonfinite and len(step.groups) == 1
    if scan_nonfinite and not scan:
        checks.raise_if_nonfinite(step.grads, skip_flag)
    step.run(partial(step.rowcol, scan=scan), step.stats, step.rms, step.scale, step.apply)
    step.write_back()
