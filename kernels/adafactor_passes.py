"""The five AdaFactor passes as Triton kernels, in launch order (rowcol, stats, rms, scale, apply),
and the per-element update factors they share; ``kernels/adafactor.py`` describes the passes and
launches them, ``kernels/adafactor_tiles.py`` holds the tile geometry and the sums of partials."""

from __future__ import annotations

import triton
import triton.language as tl

from . import _mask
from ._mask import MASK_SCALARS
from ._common import load_f32, nan_max, nan_min, store_cast, store_cast_stochastic, table_ptr, tile_coords
from .adafactor_tiles import (_COLS, _FACTORED, _FIRST, _G_NUMEL, _G_ROWS, _MASK, _OFF_RB, _OFF_RC, _ROWS,
                              _SLICES, _TILES, _TILES_C, _TILES_R, _X_COLS, _X_RBAR, _X_SUMS, _band,
                              _completed, _pair_sum, _sub, _sum_parts, _vec_sum)
from .checks import nonfinite, raise_flag


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
        b_cf = tl.rsqrt(nan_max(b_col, tiny))
    return b_cf


@triton.jit
def _factored_u(b_g, b_row, b_cf, rbar, floor1, floor2, tiny, EPS_TORCH: tl.constexpr):
    if EPS_TORCH:
        # torch.optim.Adafactor: U = g / sqrt(max(R_i·C_j / max(R̄, ε1), ε1²)), floors kept > 0
        # (R_i / R̄ first: the product R_i·C_j alone overflows fp32 for gradients of ~1e10)
        b_v = (b_row / nan_max(rbar, floor1))[:, None] * b_cf[None, :]
        b_u = tl.rsqrt(nan_max(b_v, floor2)) * b_g
    else:
        # paper: U = g·rsqrt(R_i / R̄)·rsqrt(C_j), V̂ never formed; R̄/R_i capped at 1/tiny as in the
        # reference, so a zero row (ε1 < tiny) stays a zero update
        b_rf = tl.rsqrt(nan_max(b_row / nan_max(rbar, tiny), tiny))
        b_u = b_g * b_rf[:, None] * b_cf[None, :]
    return b_u


@triton.jit
def _unfactored_u(b_g, b_v, floor2, tiny, EPS_TORCH: tl.constexpr):
    if EPS_TORCH:
        b_u = tl.rsqrt(nan_max(b_v, floor2)) * b_g
    else:
        # V ≥ ε1 unless ε1 < tiny (then a zero entry stays a zero update, as in the reference)
        b_u = tl.rsqrt(nan_max(b_v, tiny)) * b_g
    return b_u


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


@triton.jit(do_not_specialize=MASK_SCALARS)
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


@triton.jit(do_not_specialize=MASK_SCALARS)
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
    alpha = nan_min(lr * rho, cap)
    alpha = alpha * tl.where(use_scale != 0.0, nan_max(tl.sqrt(s_p / n), eps2), 1.0)
    kappa = nan_max(tl.sqrt(s_u / n) / clip, 1.0)
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


@triton.jit(do_not_specialize=MASK_SCALARS)
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
