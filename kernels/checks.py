"""Device-side gradient checks that feed a skip flag to the update kernels (no host sync)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launcher
from ._common import block_coords, load_f32, table_ptr

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def nonfinite_flag_kernel(tables, numels, block_tensor, block_chunk, flag_ptr,
                          DTYPE0: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    i_t, o_start, n = block_coords(numels, block_tensor, block_chunk, BLOCK)
    p_g = table_ptr(tables, i_t, 0, 1, DTYPE0, ALIGNED)
    o = o_start + tl.arange(0, BLOCK)
    b_g = load_f32(p_g, o, o < n, True)
    # an integer max (not a float atomic) keeps the flag deterministic
    bad = tl.max(((b_g != b_g) | (tl.abs(b_g) == float("inf"))).to(tl.int32), axis=0)
    if bad != 0:
        tl.atomic_max(flag_ptr, bad)


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """An int32 device tensor, non-zero once any gradient holds inf or NaN (set asynchronously)."""
    flag = torch.zeros(1, dtype=torch.int32, device=grads[0].device)
    grads = [_launcher.contiguous_or_copy(g) for g in grads]
    _launcher.launch(nonfinite_flag_kernel, [grads], flag, block=BLOCK, num_warps=NUM_WARPS)
    return flag
