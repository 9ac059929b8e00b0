r"""AdaFactor: the exact three-reduction algorithm (spec §1.1) in five launches per tensor group.

Every tensor is a ``[slices, rows, cols]`` view cut into ``BR × BC`` tiles (``_launcher.TilePlan``):
factored tensors view their last two axes, each leading index a slice; unfactored ones are flat,
``(1, ceil(n / BC), BC)``. All five passes run over all tensors of a group, one launch each::

    rowcol (tiles)  : Σθ² per tile; factored: per-tile row and column sums of g²         → scratch
    stats  (tiles)  : column-0 tiles finish their rows, row-0 tiles their columns, in a
                      fixed order: R ← lerp(R, Σ/n_c + ε1, w), C likewise; Σ R per row tile
    rms    (tiles)  : R̄ per slice; ΣU² per tile (unfactored: V ← (1 − w)·V + w·(g² + ε1) here)
    scale  (tensors): α = min(lr·ρ, cap)·max(ε2, RMS θ), κ = max(1, RMS U / d) → α/κ and decay
    apply  (tiles)  : U recomputed, M ← β1·M + (1 − β1)·(α/κ)·U, θ ← θ·decay − (M or (α/κ)·U)

The rowcol, rms and apply passes load g through ``_mask.load_grad``: a ChildTuning-F mask is a hash of
the element index, so the three passes see the same masked gradient without storing it.
Reductions are two-stage (partials at fixed scratch slots, summed in a fixed order): no float
atomics, bit-identical reruns. ``lr`` and the skip flag are read from device memory; no host sync.
Traffic per fp32 element (factored, no momentum): θ + g, g, θ + g + θ written = 24 bytes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .. import _distributed
from ..reference import adafactor as ref
from ..reference.adafactor import _eps1
from . import _launcher, _mask
from ._common import load_f32, store_cast, table_ptr, tile_coords, tile_offsets

BR, BC = 32, 128
# 16 warps keep the tile passes at <= 64 registers per thread (aligned groups, sm_90), 8 elements each
NUM_WARPS = 16
# the stats and scale passes work on [BR] / [BC] vectors
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
_OFF_RC = tl.constexpr(_launcher.META_USER + 3)
_OFF_RB = tl.constexpr(_launcher.META_USER + 4)


@triton.jit
def _lerp(b_old, b_new, weight):
    # torch.lerp's two-sided form: weight = 1 (step 1) gives b_new exactly
    return tl.where(weight < 0.5, b_old + weight * (b_new - b_old), b_new - (b_new - b_old) * (1.0 - weight))


@triton.jit
def _factored_u(b_g, b_row, b_col, rbar, floor1, floor2, tiny, EPS_TORCH: tl.constexpr):
    if EPS_TORCH:
        # torch.optim.Adafactor: U = g / sqrt(max(R_i·C_j / max(R̄, ε1), ε1²)), floors kept > 0
        b_v = b_row[:, None] * b_col[None, :] / tl.maximum(rbar, floor1)
        b_u = tl.rsqrt(tl.maximum(b_v, floor2)) * b_g
    else:
        # paper: U = g·rsqrt(R_i / R̄)·rsqrt(C_j), V̂ never formed
        b_rf = tl.rsqrt(b_row / tl.maximum(rbar, tiny))
        b_u = b_g * b_rf[:, None] * tl.rsqrt(b_col)[None, :]
    return b_u


@triton.jit
def _unfactored_u(b_g, b_v, floor2, EPS_TORCH: tl.constexpr):
    if EPS_TORCH:
        b_u = tl.rsqrt(tl.maximum(b_v, floor2)) * b_g
    else:
        b_u = tl.rsqrt(b_v) * b_g
    return b_u


@triton.jit
def _rowcol_tile(p_p, p_g, p_d, p_row, p_col, o, o_r, o_c, m, m_r, m_c, p_out, factored, mask_seed, mask_step, mask_threshold, mask_scale,
                 MASK_MODE: tl.constexpr, MASKED: tl.constexpr):
    b_p = load_f32(p_p, o, m, MASKED)
    tl.store(p_out, tl.sum(b_p * b_p))
    if factored:
        b_g = _mask.load_grad(p_g, p_d, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED, MASK_MODE)
        b_g = b_g * b_g
        # [BR] row partials of this column tile, [BC] column partials of this row tile
        tl.store(p_row + o_r, tl.sum(b_g, axis=1), mask=m_r)
        tl.store(p_col + o_c, tl.sum(b_g, axis=0), mask=m_c)


@triton.jit(do_not_specialize=["mask_step"])
def adafactor_rowcol_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_sqp, p_rc,
                            mask_seed, mask_step, mask_threshold, mask_scale,
                            DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                            DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, MASK_MODE: tl.constexpr,
                            CHECK_SKIP: tl.constexpr,
                            ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    # lists: 0 param, 1 grad, 2 row stat or V, 3 column stat or V, 4 exp_avg (or a stand-in)
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    o_r, o_c, o, m, full, n_r, n_c = tile_offsets(p_meta, tl.load(numels + i_t), i_s, i_r, i_c, BR, BC,
                                                  ALIGNED)
    t_r, t_c = tl.load(p_meta + _TILES_R), tl.load(p_meta + _TILES_C)
    # row partials [slices, tiles_c, rows], then column partials [slices, tiles_r, cols]
    p_rc = p_rc + tl.load(p_meta + _OFF_RC)
    p_row = p_rc + (i_s * t_c + i_c) * n_r
    p_col = p_rc + tl.load(p_meta + _SLICES) * t_c * n_r + (i_s * t_r + i_r) * n_c
    p_p = table_ptr(tables, i_t, 0, 5, DTYPE0, ALIGNED)
    p_g = table_ptr(tables, i_t, 1, 5, DTYPE1, ALIGNED)
    factored = tl.load(p_meta + _FACTORED) != 0
    p_out = p_sqp + tl.program_id(0)
    if full:
        _rowcol_tile(p_p, p_g, p_meta + _MASK, p_row, p_col, o, o_r, o_c, m, o_r < n_r, o_c < n_c, p_out,
                     factored, mask_seed, mask_step, mask_threshold, mask_scale, MASK_MODE, False)
    else:
        _rowcol_tile(p_p, p_g, p_meta + _MASK, p_row, p_col, o, o_r, o_c, m, o_r < n_r, o_c < n_c, p_out,
                     factored, mask_seed, mask_step, mask_threshold, mask_scale, MASK_MODE, True)


@triton.jit
def _finish_stat(p_part, p_stat, o_v, m_v, n_parts, stride, count, weight, eps_add, BV: tl.constexpr):
    # fixed-order sum of n_parts partial vectors (stride apart), then the EMA of the mean
    b_acc = tl.full([BV], 0.0, tl.float32)
    for k in range(n_parts):
        b_acc += tl.load(p_part + k * stride + o_v, mask=m_v, other=0.0)
    b_s = tl.load(p_stat + o_v, mask=m_v, other=0.0)
    b_s = _lerp(b_s, b_acc / count.to(tl.float32) + eps_add, weight)
    tl.store(p_stat + o_v, b_s, mask=m_v)
    return tl.sum(tl.where(m_v, b_s, 0.0))


@triton.jit
def adafactor_stats_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rc, p_rb,
                           weight, eps_add,
                           DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                           DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, CHECK_SKIP: tl.constexpr,
                           ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    if tl.load(p_meta + _FACTORED) != 0:
        n_r, n_c = tl.load(p_meta + _ROWS), tl.load(p_meta + _COLS)
        t_r, t_c = tl.load(p_meta + _TILES_R), tl.load(p_meta + _TILES_C)
        p_rc = p_rc + tl.load(p_meta + _OFF_RC)
        if i_c == 0:
            # rows of row tile i_r: R ← lerp(R, mean_j g² + ε1, w); Σ R over them → R̄ partial
            o_r = i_r * BR + tl.arange(0, BR)
            p_row = table_ptr(tables, i_t, 2, 5, DTYPE2, False) + i_s * n_r
            b_sum = _finish_stat(p_rc + i_s * t_c * n_r, p_row, o_r, o_r < n_r, t_c, n_r, n_c,
                                 weight, eps_add, BR)
            tl.store(p_rb + tl.load(p_meta + _OFF_RB) + i_s * t_r + i_r, b_sum)
        if i_r == 0:
            # columns of column tile i_c: C ← lerp(C, mean_i g² + ε1, w)
            o_c = i_c * BC + tl.arange(0, BC)
            p_col = table_ptr(tables, i_t, 3, 5, DTYPE3, False) + i_s * n_c
            p_part = p_rc + tl.load(p_meta + _SLICES) * t_c * n_r + i_s * t_r * n_c
            _finish_stat(p_part, p_col, o_c, o_c < n_c, t_r, n_c, n_r, weight, eps_add, BC)


@triton.jit
def _row_mean(p_rb, t_r, n_r, BV: tl.constexpr):
    # R̄ of one slice from its [tiles_r] partial sums, in a fixed order
    b_acc = tl.full([BV], 0.0, tl.float32)
    for k in range(0, t_r, BV):
        o_k = k + tl.arange(0, BV)
        b_acc += tl.load(p_rb + o_k, mask=o_k < t_r, other=0.0)
    return tl.sum(b_acc) / n_r.to(tl.float32)


@triton.jit
def _rms_tile(p_g, p_d, p_a, p_b, o, o_sr, o_sc, m, m_r, m_c, rbar, factored, sign, weight, omw, w_eps,
              floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale, EPS_TORCH: tl.constexpr, MASK_MODE: tl.constexpr,
              MASKED: tl.constexpr):
    b_g = _mask.load_grad(p_g, p_d, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED, MASK_MODE) * sign
    if factored:
        b_row = tl.load(p_a + o_sr, mask=m_r, other=1.0)
        b_col = tl.load(p_b + o_sc, mask=m_c, other=1.0)
        b_u = _factored_u(b_g, b_row, b_col, rbar, floor1, floor2, tiny, EPS_TORCH)
    else:
        b_v = load_f32(p_a, o, m, MASKED)
        if EPS_TORCH:
            b_v = _lerp(b_v, b_g * b_g, weight)
        else:
            b_v = b_v * omw + weight * b_g * b_g + w_eps
        store_cast(p_a, o, b_v, m, MASKED)
        b_u = _unfactored_u(b_g, b_v, floor2, EPS_TORCH)
    if MASKED:
        b_u = tl.where(m, b_u, 0.0)
    return tl.sum(b_u * b_u)


@triton.jit(do_not_specialize=["mask_step"])
def adafactor_rms_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rb, p_squ,
                         sign, weight, omw, w_eps, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale,
                         DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                         DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, EPS_TORCH: tl.constexpr,
                         MASK_MODE: tl.constexpr,
                         CHECK_SKIP: tl.constexpr, ALIGNED: tl.constexpr, BR: tl.constexpr,
                         BC: tl.constexpr, NMETA: tl.constexpr):
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    o_r, o_c, o, m, full, n_r, n_c = tile_offsets(p_meta, tl.load(numels + i_t), i_s, i_r, i_c, BR, BC,
                                                  ALIGNED)
    factored = tl.load(p_meta + _FACTORED) != 0
    rbar = tl.full([], 1.0, tl.float32)
    if factored:
        t_r = tl.load(p_meta + _TILES_R)
        p_rb = p_rb + tl.load(p_meta + _OFF_RB)
        rbar = _row_mean(p_rb + i_s * t_r, t_r, n_r, BC)
        if (i_r == 0) & (i_c == 0):
            # R̄ of the slice for the apply pass, after the [slices, tiles_r] partials
            tl.store(p_rb + tl.load(p_meta + _SLICES) * t_r + i_s, rbar)
    p_g = table_ptr(tables, i_t, 1, 5, DTYPE1, ALIGNED)
    p_a = table_ptr(tables, i_t, 2, 5, DTYPE2, ALIGNED)
    p_b = table_ptr(tables, i_t, 3, 5, DTYPE3, ALIGNED)
    o_sr, o_sc = i_s * n_r + o_r, i_s * n_c + o_c
    if full:
        b_sum = _rms_tile(p_g, p_meta + _MASK, p_a, p_b, o, o_sr, o_sc, m, o_r < n_r, o_c < n_c, rbar,
                          factored, sign, weight, omw, w_eps, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale, EPS_TORCH,
                          MASK_MODE, False)
    else:
        b_sum = _rms_tile(p_g, p_meta + _MASK, p_a, p_b, o, o_sr, o_sc, m, o_r < n_r, o_c < n_c, rbar,
                          factored, sign, weight, omw, w_eps, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale, EPS_TORCH,
                          MASK_MODE, True)
    tl.store(p_squ + tl.program_id(0), b_sum)


@triton.jit
def adafactor_scale_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, lr_ptr, p_sqp,
                           p_squ, p_scale, rho, cap, eps2, use_scale, clip, wd_alpha, wd_lr,
                           DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                           DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, CHECK_SKIP: tl.constexpr,
                           ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    # one program per tensor
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t = tl.program_id(0).to(tl.int64)
    p_meta = meta + i_t * NMETA
    first, tiles = tl.load(p_meta + _FIRST), tl.load(p_meta + _TILES)
    b_p = tl.full([BC], 0.0, tl.float32)
    b_u = tl.full([BC], 0.0, tl.float32)
    for k in range(0, tiles, BC):
        o_k = k + tl.arange(0, BC)
        b_p += tl.load(p_sqp + first + o_k, mask=o_k < tiles, other=0.0)
        b_u += tl.load(p_squ + first + o_k, mask=o_k < tiles, other=0.0)
    n = tl.load(numels + i_t).to(tl.float32)
    lr = tl.load(lr_ptr)
    # α = ρ·max(ε2, RMS θ) (ρ = min(lr·ρ_t, cap)); the update is α/κ with κ = max(1, RMS U / d)
    alpha = tl.minimum(lr * rho, cap)
    alpha = alpha * tl.where(use_scale != 0.0, tl.maximum(tl.sqrt(tl.sum(b_p) / n), eps2), 1.0)
    kappa = tl.maximum(tl.sqrt(tl.sum(b_u) / n) / clip, 1.0)
    tl.store(p_scale + 2 * i_t, alpha / kappa)
    tl.store(p_scale + 2 * i_t + 1, 1.0 - (wd_alpha * alpha + wd_lr * lr))


@triton.jit
def _apply_tile(p_p, p_g, p_d, p_a, p_b, p_m, o, o_sr, o_sc, m, m_r, m_c, rbar, factored, scale, decay,
                sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale, EPS_TORCH: tl.constexpr,
                MOMENTUM: tl.constexpr, MASK_MODE: tl.constexpr, MASKED: tl.constexpr):
    b_g = _mask.load_grad(p_g, p_d, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED, MASK_MODE) * sign
    if factored:
        b_row = tl.load(p_a + o_sr, mask=m_r, other=1.0)
        b_col = tl.load(p_b + o_sc, mask=m_c, other=1.0)
        b_u = _factored_u(b_g, b_row, b_col, rbar, floor1, floor2, tiny, EPS_TORCH)
    else:
        # V was updated by the rms pass; masked lanes read 1 so rsqrt stays finite there
        b_v = load_f32(p_a, o, m, MASKED)
        if MASKED:
            b_v = tl.where(m, b_v, 1.0)
        b_u = _unfactored_u(b_g, b_v, floor2, EPS_TORCH)
    b_p = load_f32(p_p, o, m, MASKED)
    if MOMENTUM:
        b_m = load_f32(p_m, o, m, MASKED)
        b_m = b_m * beta1 + omb1 * b_u * scale
        store_cast(p_m, o, b_m, m, MASKED)
        b_p = b_p * decay - b_m
    else:
        b_p = b_p * decay - b_u * scale
    store_cast(p_p, o, b_p, m, MASKED)


@triton.jit(do_not_specialize=["mask_step"])
def adafactor_apply_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rb, p_scale,
                           sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale,
                           DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                           DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, EPS_TORCH: tl.constexpr,
                           MOMENTUM: tl.constexpr, MASK_MODE: tl.constexpr, CHECK_SKIP: tl.constexpr,
                           ALIGNED: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    o_r, o_c, o, m, full, n_r, n_c = tile_offsets(p_meta, tl.load(numels + i_t), i_s, i_r, i_c, BR, BC,
                                                  ALIGNED)
    factored = tl.load(p_meta + _FACTORED) != 0
    rbar = tl.full([], 1.0, tl.float32)
    if factored:
        t_r = tl.load(p_meta + _TILES_R)
        rbar = tl.load(p_rb + tl.load(p_meta + _OFF_RB) + tl.load(p_meta + _SLICES) * t_r + i_s)
    scale, decay = tl.load(p_scale + 2 * i_t), tl.load(p_scale + 2 * i_t + 1)
    p_p = table_ptr(tables, i_t, 0, 5, DTYPE0, ALIGNED)
    p_g = table_ptr(tables, i_t, 1, 5, DTYPE1, ALIGNED)
    p_a = table_ptr(tables, i_t, 2, 5, DTYPE2, ALIGNED)
    p_b = table_ptr(tables, i_t, 3, 5, DTYPE3, ALIGNED)
    if MOMENTUM:
        p_m = table_ptr(tables, i_t, 4, 5, DTYPE4, ALIGNED)
    else:
        p_m = p_g
    o_sr, o_sc = i_s * n_r + o_r, i_s * n_c + o_c
    if full:
        _apply_tile(p_p, p_g, p_meta + _MASK, p_a, p_b, p_m, o, o_sr, o_sc, m, o_r < n_r, o_c < n_c, rbar,
                    factored, scale, decay, sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale, EPS_TORCH,
                    MOMENTUM, MASK_MODE, False)
    else:
        _apply_tile(p_p, p_g, p_meta + _MASK, p_a, p_b, p_m, o, o_sr, o_sc, m, o_r < n_r, o_c < n_c, rbar,
                    factored, scale, decay, sign, beta1, omb1, floor1, floor2, tiny, mask_seed, mask_step, mask_threshold, mask_scale, EPS_TORCH,
                    MOMENTUM, MASK_MODE, True)


def _view(t: torch.Tensor, factored: bool) -> tuple[int, int, int]:
    """``(slices, rows, cols)``: the last two axes of a factored tensor, else flat rows of ``BC``."""
    if factored:
        n_r, n_c = t.shape[-2], t.shape[-1]
        return t.numel() // max(n_r * n_c, 1), n_r, n_c
    return 1, -(-t.numel() // BC), BC


def _scratch_sizes(view: tuple[int, int, int], factored: bool) -> tuple[int, int]:
    """Row/column partials ``S·(t_c·n_r + t_r·n_c)`` and R̄ partials plus finals ``S·(t_r + 1)``."""
    if not factored:
        return 0, 0
    slices, n_r, n_c = view
    t_r, t_c = _launcher.tile_counts(view, (BR, BC))
    return slices * (t_c * n_r + t_r * n_c), slices * (t_r + 1)


def launch(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]],
           hp: Any, sc: Any, lr: Any, skip_flag: torch.Tensor | None = None) -> None:
    """Host launcher: five launches per (device, dtype, alignment) group of tensors, whatever their number.

    ``skip_flag``, when given, is a device int32 tensor; a non-zero value makes every pass a no-op
    (parameters and all state untouched), with no host synchronisation.
    """
    if any(_distributed.SHARD_KEY in s for s in states):
        _launch_sharded(params, grads, states, hp, sc, lr, skip_flag)
        return
    factored = ["exp_avg_sq_row" in s for s in states]
    stat_a = [s["exp_avg_sq_row"] if f else s["exp_avg_sq"] for s, f in zip(states, factored)]
    stat_b = [s["exp_avg_sq_col"] if f else s["exp_avg_sq"] for s, f in zip(states, factored)]
    work = [_launcher.contiguous_or_copy(p) for p in params]
    grads = [_launcher.contiguous_or_copy(g) for g in grads]
    mask = _mask.prepare(grads, states, hp.mask)
    momentum = hp.beta1 is not None
    # without momentum list 4 is a never-read stand-in, so every kernel keeps one signature
    exp_avg = [s["exp_avg"] for s in states] if momentum else grads
    views = [_view(p, f) for p, f in zip(params, factored)]
    sizes = [_scratch_sizes(v, f) for v, f in zip(views, factored)]
    device = params[0].device
    lr_t = _launcher.device_scalar(lr, device, _lr_cache)
    flag = skip_flag if skip_flag is not None else lr_t
    check = skip_flag is not None
    torch_eps = hp.eps_mode == "torch"
    sign = -1.0 if hp.maximize else 1.0
    if hp.relative_step and hp.lr_mode == "rho_max":
        rho, cap = 1.0, sc.inv_sqrt_step
    else:
        rho, cap = sc.rho, float("inf")
    hf_decay = hp.decay_mode == "hf"
    beta1 = hp.beta1 if momentum else 0.0
    lists = [work, grads, stat_a, stat_b, exp_avg]
    columns = [[int(f) for f in factored], *mask.columns]
    segments = [[s[0] for s in sizes], [s[1] for s in sizes]]
    for idx, plan in _launcher.tile_groups(lists, views, (BR, BC), columns, segments):
        eps1 = _eps1(hp, params[idx[0]].dtype)
        # torch mode's clamp floors ε1 (on R̄) and ε1² (on V̂, V), kept positive in fp32 as the
        # reference does (ε1² = 1e-60 would flush to 0 and a zero row give 0·rsqrt(0))
        floor1, floor2 = max(eps1, _TINY), max(eps1 * eps1, _TINY)
        p_sqp = _launcher.workspace("adafactor.sq_param", plan.n_blocks, device)
        p_squ = _launcher.workspace("adafactor.sq_update", plan.n_blocks, device)
        p_rc = _launcher.workspace("adafactor.rowcol", plan.segment_sizes[0], device)
        p_rb = _launcher.workspace("adafactor.row_mean", plan.segment_sizes[1], device)
        p_scale = _launcher.workspace("adafactor.scale", 2 * plan.n_tensors, device)
        plan.launch(adafactor_rowcol_kernel, flag, p_sqp, p_rc, *mask.args, num_warps=NUM_WARPS,
                    MASK_MODE=mask.mode, CHECK_SKIP=check)
        plan.launch(adafactor_stats_kernel, flag, p_rc, p_rb, sc.weight, 0.0 if torch_eps else eps1,
                    num_warps=SMALL_WARPS, CHECK_SKIP=check)
        plan.launch(adafactor_rms_kernel, flag, p_rb, p_squ, sign, sc.weight, 1.0 - sc.weight,
                    sc.weight * eps1, floor1, floor2, _TINY, *mask.args,
                    num_warps=NUM_WARPS, EPS_TORCH=torch_eps, MASK_MODE=mask.mode, CHECK_SKIP=check)
        plan.launch(adafactor_scale_kernel, flag, lr_t, p_sqp, p_squ, p_scale, rho, cap, hp.eps2,
                    float(hp.scale_parameter), hp.clip_threshold,
                    hp.weight_decay if hf_decay else 0.0, 0.0 if hf_decay else hp.weight_decay,
                    per_tensor=True, num_warps=SMALL_WARPS, CHECK_SKIP=check)
        plan.launch(adafactor_apply_kernel, flag, p_rb, p_scale, sign, beta1, 1.0 - beta1, floor1,
                    floor2, _TINY, *mask.args, num_warps=NUM_WARPS, EPS_TORCH=torch_eps, MOMENTUM=momentum,
                    MASK_MODE=mask.mode, CHECK_SKIP=check)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def _launch_sharded(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                    hp: Any, sc: Any, lr: Any, skip_flag: torch.Tensor | None) -> None:
    """FSDP2 shards: unsharded tensors take the kernels; sharded ones the reference step.

    The statistics of a sharded tensor must be completed across ranks between the rowcol, stats and
    rms passes; these kernels do not issue those all-reduces yet, so sharded tensors run the
    reference (whose means and RMS values are all-reduced, ``optimfx/_distributed.py``).
    """
    plain = [i for i, s in enumerate(states) if _distributed.SHARD_KEY not in s]
    if plain:
        launch([params[i] for i in plain], [grads[i] for i in plain], [states[i] for i in plain], hp, sc, lr,
               skip_flag)
    # the reference decides on the host: this path reads the flag (a synchronisation the kernels avoid)
    if skip_flag is not None and bool(skip_flag.ne(0).any()):
        return
    lr_f = float(lr) if isinstance(lr, torch.Tensor) else lr
    for p, g, s in zip(params, grads, states):
        if _distributed.SHARD_KEY in s:
            ref.step_(p, g, s, hp, sc, lr_f)
