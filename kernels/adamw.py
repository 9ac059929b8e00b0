r"""AdamW (with ChildTuning masks): one fused elementwise pass over all tensors of a group (spec §4.1).

Per element, in fp32 (``c1``, ``c2`` from the host as in ``reference/adamw.py``; ``lr`` from device
memory)::

    g  = sign·load_grad(g)                  ChildTuning-F/D mask applied on load (``_mask.py``)
    m  = lerp(m, g, 1 − β1)
    v  = β2·v + (1 − β2)·g²
    d  = m / (c2·sqrt(v) + ε)
    θ  = θ·(1 − lr·λ) − lr·c1·d             decay_order="torch"
    θ  = (θ − lr·c1·d)·(1 − lr·λ)           decay_order="alicemind"

Traffic: reads θ, g, m, v and writes θ, m, v — 28 bytes per fp32 parameter (+1 byte for a D mask).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from . import _launcher, _mask
from ._mask import MASK_SCALARS
from ._common import block_coords, load_f32, store_cast, store_cast_stochastic, table_ptr

BLOCK = 2048
NUM_WARPS = 8
_lr_cache: dict = {}


@triton.jit
def _adamw_block(p_p, p_g, p_m, p_v, p_k, o, m, lr, omb1, beta2, omb2, eps, c1, c2, weight_decay, sign,
                 mask_seed, mask_step, mask_threshold, mask_scale, round_key, DECAY_FIRST: tl.constexpr,
                 MASK_MODE: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr):
    b_g = _mask.load_grad(p_g, p_k, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED,
                          MASK_MODE) * sign
    b_m = load_f32(p_m, o, m, MASKED)
    b_v = load_f32(p_v, o, m, MASKED)
    # torch.lerp's two-sided form, as the reference's exp_avg.lerp_
    b_m = tl.where(omb1 < 0.5, b_m + omb1 * (b_g - b_m), b_g - (b_g - b_m) * (1.0 - omb1))
    b_v = b_v * beta2 + omb2 * b_g * b_g
    # IEEE square root, as torch's Adam kernels (tl.sqrt is approximate on the GPU and flushes
    # subnormal moments to 0)
    b_d = b_m / (tl.sqrt_rn(b_v) * c2 + eps)
    b_p = load_f32(p_p, o, m, MASKED)
    keep = 1.0 - lr * weight_decay
    if DECAY_FIRST:
        b_p = b_p * keep - (lr * c1) * b_d
    else:
        b_p = (b_p - (lr * c1) * b_d) * keep
    store_cast(p_m, o, b_m, m, MASKED)
    store_cast(p_v, o, b_v, m, MASKED)
    if STOCHASTIC:
        store_cast_stochastic(p_p, o, b_p, m, round_key, MASKED)
    else:
        store_cast(p_p, o, b_p, m, MASKED)


@triton.jit(do_not_specialize=MASK_SCALARS)
def adamw_step_kernel(tables, numels, block_tensor, block_chunk, lr_ptr, skip_ptr,
                      omb1, beta2, omb2, eps, c1, c2, weight_decay, sign,
                      mask_seed, mask_step, mask_threshold, mask_scale, round_key,
                      DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr, DTYPE3: tl.constexpr,
                      DTYPE4: tl.constexpr, DECAY_FIRST: tl.constexpr, MASK_MODE: tl.constexpr,
                      STOCHASTIC: tl.constexpr, CHECK_SKIP: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK: tl.constexpr):
    # lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 mask descriptor (``_mask.py``)
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i_t, o_start, n = block_coords(numels, block_tensor, block_chunk, BLOCK)
    p_p = table_ptr(tables, i_t, 0, 5, DTYPE0, ALIGNED)
    p_g = table_ptr(tables, i_t, 1, 5, DTYPE1, ALIGNED)
    p_m = table_ptr(tables, i_t, 2, 5, DTYPE2, ALIGNED)
    p_v = table_ptr(tables, i_t, 3, 5, DTYPE3, ALIGNED)
    p_k = table_ptr(tables, i_t, 4, 5, DTYPE4, ALIGNED)
    lr = tl.load(lr_ptr)
    o = o_start + tl.arange(0, BLOCK)
    if o_start + BLOCK <= n:
        _adamw_block(p_p, p_g, p_m, p_v, p_k, o, o < n, lr, omb1, beta2, omb2, eps, c1, c2, weight_decay,
                     sign, mask_seed, mask_step, mask_threshold, mask_scale, round_key, DECAY_FIRST,
                     MASK_MODE, STOCHASTIC, False)
    else:
        _adamw_block(p_p, p_g, p_m, p_v, p_k, o, o < n, lr, omb1, beta2, omb2, eps, c1, c2, weight_decay,
                     sign, mask_seed, mask_step, mask_threshold, mask_scale, round_key, DECAY_FIRST,
                     MASK_MODE, STOCHASTIC, True)


def launch(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]],
           hp: Any, sc: Any, lr: Any, skip_flag: torch.Tensor | None = None,
           round_key: int | None = None) -> None:
    """Host launcher: one kernel launch per (device, dtype, alignment) group of tensors.

    ``skip_flag``, when given, is a device int32 tensor; a non-zero value makes the launch a no-op
    (set by :func:`optimfx._kernels.checks.nonfinite_flag`), with no host synchronisation.
    ``round_key``, when given, writes bf16 parameters by stochastic rounding with that key
    (:func:`optimfx._precision.round_key`).
    """
    exp_avg = [s["exp_avg"] for s in states]
    exp_avg_sq = [s["exp_avg_sq"] for s in states]
    work = _launcher.contiguous_list(params)
    grads = _launcher.contiguous_list(grads)
    mask = _mask.prepare(grads, states, hp.mask)
    lr_t = _launcher.device_scalar(lr, params[0].device, _lr_cache)
    _launcher.launch(
        adamw_step_kernel, [work, grads, exp_avg, exp_avg_sq, mask.aux],
        lr_t, skip_flag if skip_flag is not None else lr_t,
        1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, hp.eps, sc.c1, sc.c2, hp.weight_decay,
        -1.0 if hp.maximize else 1.0, *mask.args, 3 if round_key is None else round_key,
        block=BLOCK, num_warps=NUM_WARPS,
        DECAY_FIRST=hp.decay_order == "torch", MASK_MODE=mask.mode, STOCHASTIC=round_key is not None,
        CHECK_SKIP=skip_flag is not None,
    )
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
