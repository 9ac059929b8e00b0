"""The multi-tensor launcher: every element of every tensor is visited exactly once, one launch per group."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from optimfx._kernels import _launcher  # noqa: E402
from optimfx._kernels._common import block_coords, load_f32, store_cast, table_ptr  # noqa: E402

BLOCK = 64


@triton.jit
def _increment_kernel(tables, numels, block_tensor, block_chunk, DTYPE0: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    i_t, o_start, n = block_coords(numels, block_tensor, block_chunk, BLOCK)
    p_x = table_ptr(tables, i_t, 0, 1, DTYPE0, ALIGNED)
    o = o_start + tl.arange(0, BLOCK)
    if o_start + BLOCK <= n:
        store_cast(p_x, o, load_f32(p_x, o, o < n, False) + 1.0, o < n, False)
    else:
        store_cast(p_x, o, load_f32(p_x, o, o < n, True) + 1.0, o < n, True)


def _increment(tensors):
    _launcher.launch(_increment_kernel, [tensors], block=BLOCK, num_warps=4)


SIZES = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 1, 5 * BLOCK + 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_element_visited_once(dtype):
    xs = [torch.zeros(n, dtype=dtype) for n in SIZES]
    _increment(xs)
    for x in xs:
        assert torch.equal(x, torch.ones_like(x))


def test_blocks_map_to_tensor_and_chunk():
    xs = [torch.zeros(n) for n in SIZES]
    plan = _launcher.plan([xs], BLOCK)
    chunks = [(n + BLOCK - 1) // BLOCK for n in SIZES]
    assert plan.n_blocks == sum(chunks)
    expected_tensor = [i for i, c in enumerate(chunks) for _ in range(c)]
    expected_chunk = [j for c in chunks for j in range(c)]
    assert plan.block_tensor.tolist() == expected_tensor
    assert plan.block_chunk.tolist() == expected_chunk
    assert plan.tables.dtype == torch.int64 and plan.numels.tolist() == SIZES


def test_groups_split_by_dtype_and_alignment_and_skip_empty():
    base = torch.zeros(200)
    unaligned = base[1:101]  # 4-byte offset: not 16-byte aligned
    xs = [torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16), unaligned, torch.zeros(0), torch.zeros(7)]
    groups = _launcher.groups([xs])
    assert sorted(map(sorted, groups)) == [[0, 4], [1], [2]]
    _increment(xs)
    assert torch.equal(unaligned, torch.ones(100))
    assert base[0] == 0 and torch.equal(base[101:], torch.zeros(99))


def test_one_launch_per_group(monkeypatch):
    calls = []
    real = _launcher.plan

    def spy(lists, block):
        calls.append(len(lists[0]))
        return real(lists, block)

    monkeypatch.setattr(_launcher, "plan", spy)
    _increment([torch.zeros(n) for n in SIZES])
    assert calls == [len(SIZES)]


def test_plan_cache_hits_and_rebuilds_when_storage_moves():
    xs = [torch.zeros(5), torch.zeros(70)]
    first = _launcher.plan([xs], BLOCK)
    assert _launcher.plan([xs], BLOCK) is first
    old = xs[1]  # kept alive so the allocator cannot hand the same address back
    xs[1] = torch.zeros(70)
    assert xs[1].data_ptr() != old.data_ptr()
    rebuilt = _launcher.plan([xs], BLOCK)
    assert rebuilt is not first and rebuilt.tables[1, 0] == xs[1].data_ptr()


def test_device_scalar_follows_value_changes():
    cache: dict = {}
    a = _launcher.device_scalar(0.5, torch.device("cpu"), cache)
    assert a.item() == 0.5
    b = _launcher.device_scalar(0.25, torch.device("cpu"), cache)
    assert b.item() == 0.25
    t = _launcher.device_scalar(torch.tensor(3.0, dtype=torch.float64), torch.device("cpu"), cache)
    assert t.dtype == torch.float32 and t.item() == 3.0
