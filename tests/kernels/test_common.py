"""The rounding every kernel uses to write low-precision parameters equals torch's own casts."""

from __future__ import annotations

import pytest
import torch
from _device import KERNEL_DEVICE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from optimfx._kernels._common import store_cast  # noqa: E402


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    store_cast(y_ptr, o, tl.load(x_ptr + o, mask=m), m, True)


def _special_values():
    gen = torch.Generator().manual_seed(0)
    random = torch.randn(4096, generator=gen) * torch.logspace(-40, 38, 4096).float()
    # exact ties between two bf16 neighbours, both parities, and their neighbours in fp32
    base = torch.randn(512, generator=gen).bfloat16().float()
    bits = base.view(torch.int32)
    ties = (bits + 0x8000).view(torch.float32)
    near = torch.cat([(bits + 0x7FFF).view(torch.float32), (bits + 0x8001).view(torch.float32)])
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895e38, -3.3895e38, 1e-45, 6e-39])
    return torch.cat([random, ties, near, special])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_cast_rounds_like_torch(dtype):
    x = _special_values()
    y = torch.empty(x.shape, dtype=dtype, device=KERNEL_DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(KERNEL_DEVICE), y, x.numel(), BLOCK=1024)
    # torch's CPU cast is the reference on every device
    assert torch.equal(y.cpu().view(torch.int16), x.to(dtype).view(torch.int16))


def test_store_cast_keeps_nan():
    x = torch.tensor([float("nan"), 1.0], device=KERNEL_DEVICE).repeat(8)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=16)
    y = y.cpu()
    assert torch.isnan(y[0::2]).all() and torch.equal(y[1::2].float(), torch.ones(8))
