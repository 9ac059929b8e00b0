"""The multi-tensor launcher: every element of every tensor is visited exactly once, one launch per group.

Tensors live on ``KERNEL_DEVICE``, as the plans' device tables do, including in the tests that only
build plans.
"""

from __future__ import annotations

import pytest
import torch
from _device import KERNEL_DEVICE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from optimfx._kernels import _launcher  # noqa: E402
from optimfx._kernels._common import (  # noqa: E402
    block_coords, load_f32, store_cast, table_ptr, tile_coords, tile_offsets,
)

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


def _zeros(*size, dtype=torch.float32):
    return torch.zeros(*size, dtype=dtype, device=KERNEL_DEVICE)


def _increment(tensors):
    _launcher.launch(_increment_kernel, [tensors], block=BLOCK, num_warps=4)


SIZES = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 1, 5 * BLOCK + 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_element_visited_once(dtype):
    xs = [_zeros(n, dtype=dtype) for n in SIZES]
    _increment(xs)
    for x in xs:
        assert torch.equal(x, torch.ones_like(x))


def test_blocks_map_to_tensor_and_chunk():
    xs = [_zeros(n) for n in SIZES]
    plan = _launcher.plan([xs], BLOCK)
    chunks = [(n + BLOCK - 1) // BLOCK for n in SIZES]
    assert plan.n_blocks == sum(chunks)
    expected_tensor = [i for i, c in enumerate(chunks) for _ in range(c)]
    expected_chunk = [j for c in chunks for j in range(c)]
    assert plan.block_tensor.tolist() == expected_tensor
    assert plan.block_chunk.tolist() == expected_chunk
    assert plan.tables.dtype == torch.int64 and plan.numels.tolist() == SIZES


def test_groups_split_by_dtype_and_alignment_and_skip_empty():
    base = _zeros(200)
    unaligned = base[1:101]  # 4-byte offset: not 16-byte aligned
    xs = [_zeros(10), _zeros(10, dtype=torch.bfloat16), unaligned, _zeros(0), _zeros(7)]
    groups = _launcher.groups([xs])
    assert sorted(map(sorted, groups)) == [[0, 4], [1], [2]]
    _increment(xs)
    assert torch.equal(unaligned, torch.ones_like(unaligned))
    assert base[0] == 0 and torch.equal(base[101:], _zeros(99))


def test_one_launch_per_group(monkeypatch):
    calls = []
    real = _launcher._enqueue

    def spy(kernel, grid, *args, **kwargs):
        calls.append(grid)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_launcher, "_enqueue", spy)
    _increment([_zeros(n) for n in SIZES])
    assert calls == [(sum((n + BLOCK - 1) // BLOCK for n in SIZES),)]


def test_launch_plans_are_cached_and_follow_moved_storage():
    xs = [_zeros(5), _zeros(70)]
    first = _launcher.launch_plans([xs], BLOCK)
    assert _launcher.launch_plans([xs], BLOCK) is first
    old = xs[0]
    xs[0] = _zeros(5)
    assert xs[0].data_ptr() != old.data_ptr()
    moved = _launcher.launch_plans([xs], BLOCK)
    assert moved is not first and moved[0].tables[0, 0] == xs[0].data_ptr()
    _increment(xs)
    assert all(torch.equal(x, torch.ones_like(x)) for x in xs) and torch.equal(old, _zeros(5))


def test_plan_cache_hits_and_rebuilds_when_storage_moves():
    xs = [_zeros(5), _zeros(70)]
    first = _launcher.plan([xs], BLOCK)
    assert _launcher.plan([xs], BLOCK) is first
    old = xs[1]  # kept alive so the allocator cannot hand the same address back
    xs[1] = _zeros(70)
    assert xs[1].data_ptr() != old.data_ptr()
    rebuilt = _launcher.plan([xs], BLOCK)
    assert rebuilt is not first and rebuilt.tables[1, 0] == xs[1].data_ptr()


def test_device_scalar_follows_value_changes():
    cache: dict = {}
    a = _launcher.device_scalar(0.5, KERNEL_DEVICE, cache)
    assert a.item() == 0.5
    b = _launcher.device_scalar(0.25, KERNEL_DEVICE, cache)
    assert b.item() == 0.25
    t = _launcher.device_scalar(torch.tensor(3.0, dtype=torch.float64), KERNEL_DEVICE, cache)
    assert t.device.type == KERNEL_DEVICE.type and t.dtype == torch.float32 and t.item() == 3.0


TILE = (4, 16)


@triton.jit
def _tile_increment_kernel(tables, numels, block_tensor, block_chunk, meta, p_out, DTYPE0: tl.constexpr,
                           ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    # adds 1 to every element of the tile; records (tensor, slice, tile row, tile col, full) per program
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    o_r, o_c, o, m, full, n_r, n_c = tile_offsets(p_meta, tl.load(numels + i_t), i_s, i_r, i_c, BR, BC,
                                                  ALIGNED)
    p_x = table_ptr(tables, i_t, 0, 1, DTYPE0, ALIGNED)
    if full:
        store_cast(p_x, o, load_f32(p_x, o, m, False) + 1.0, m, False)
    else:
        store_cast(p_x, o, load_f32(p_x, o, m, True) + 1.0, m, True)
    p_out = p_out + tl.program_id(0) * 5
    tl.store(p_out, i_t)
    tl.store(p_out + 1, i_s)
    tl.store(p_out + 2, i_r)
    tl.store(p_out + 3, i_c)
    tl.store(p_out + 4, full.to(tl.int64))


@triton.jit
def _per_tensor_kernel(tables, numels, block_tensor, block_chunk, meta, p_out, DTYPE0: tl.constexpr,
                       ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    # copies tensor pid's meta row (one program per tensor)
    i_t = tl.program_id(0)
    o = tl.arange(0, 16)
    tl.store(p_out + i_t * NMETA + o, tl.load(meta + i_t * NMETA + o, mask=o < NMETA), mask=o < NMETA)


def _flat(n):
    return (1, -(-n // TILE[1]), TILE[1])


# (tensor, view): matrices and batches of matrices on the tile boundaries, flat tensors with padded rows
TILE_CASES = [
    (torch.zeros(5, 7), (1, 5, 7)),
    (torch.zeros(3, 5, 7), (3, 5, 7)),
    (torch.zeros(2, 8, 32), (2, 8, 32)),
    (torch.zeros(9, 17), (1, 9, 17)),
    (torch.zeros(1, 1), (1, 1, 1)),
    (torch.zeros(37), _flat(37)),
    (torch.zeros(64), _flat(64)),
    (torch.zeros(()), _flat(1)),
]


def _expected_tiles(views):
    out = []
    for i, (slices, n_r, n_c) in enumerate(views):
        t_r, t_c = _launcher.tile_counts((slices, n_r, n_c), TILE)
        for s in range(slices):
            for r in range(t_r):
                for c in range(t_c):
                    out.append((i, s, r, c))
    return out


def test_tile_plan_visits_every_element_once_and_decodes_tiles():
    tensors = [t.to(KERNEL_DEVICE, copy=True) for t, _ in TILE_CASES]
    views = [v for _, v in TILE_CASES]
    plan = _launcher.tile_plan([tensors], views, TILE)
    out = torch.full((plan.n_blocks, 5), -1, dtype=torch.int64, device=KERNEL_DEVICE)
    plan.launch(_tile_increment_kernel, out, num_warps=4)
    for t in tensors:
        assert torch.equal(t, torch.ones_like(t))
    assert [tuple(r) for r in out[:, :4].tolist()] == _expected_tiles(views)
    # full tiles: whole BR x BC inside the view and inside numel
    full = {(i, s, r, c) for i, s, r, c, f in out.tolist() if f}
    assert full == {(2, s, r, c) for s in range(2) for r in range(2) for c in range(2)} | {
        (3, 0, 0, 0), (3, 0, 1, 0), (6, 0, 0, 0)}


def test_tile_plan_leaves_neighbouring_memory_alone():
    storage = _zeros(2 + 9 * 17 + 3)
    x = storage[2:2 + 9 * 17].view(9, 17)
    plan = _launcher.tile_plan([[x]], [(1, 9, 17)], TILE)
    out = torch.empty(plan.n_blocks * 5, dtype=torch.int64, device=KERNEL_DEVICE)
    plan.launch(_tile_increment_kernel, out, num_warps=4)
    assert torch.equal(x, torch.ones_like(x))
    assert storage[:2].eq(0).all() and storage[2 + 9 * 17:].eq(0).all()


def test_tile_plan_meta_columns_and_segments():
    xs = [_zeros(3, 5, 7), _zeros(37), _zeros(9, 17)]
    views = [(3, 5, 7), _flat(37), (1, 9, 17)]
    plan = _launcher.tile_plan([xs], views, TILE, columns=[[1, 0, 1]], segments=[[10, 0, 4], [2, 3, 0]])
    meta = plan.meta.tolist()
    tiles = [3 * 2 * 1, 1 * 1 * 1, 1 * 3 * 2]
    firsts = [0, tiles[0], tiles[0] + tiles[1]]
    assert [row[:len(_launcher.TILE_META)] for row in meta] == [
        [3, 5, 7, 2, 1, firsts[0], tiles[0]],
        [1, 3, 16, 1, 1, firsts[1], tiles[1]],
        [1, 9, 17, 3, 2, firsts[2], tiles[2]],
    ]
    user = _launcher.META_USER
    assert [row[user] for row in meta] == [1, 0, 1]
    # segment offsets are exclusive prefix sums of the sizes, one column per segment
    assert [row[user + 1] for row in meta] == [0, 10, 10]
    assert [row[user + 2] for row in meta] == [0, 2, 5]
    assert plan.segment_sizes == (14, 5) and plan.n_blocks == sum(tiles) and plan.n_tensors == 3
    assert plan.meta.dtype == torch.int64 and plan.block_tensor.dtype == torch.int32
    out = _zeros(3, plan.meta.shape[1], dtype=torch.int64)
    plan.launch(_per_tensor_kernel, out, num_warps=1, per_tensor=True)
    assert torch.equal(out, plan.meta)


def test_tile_groups_split_on_row_alignment_and_subset_columns():
    xs = [_zeros(4, 32), _zeros(4, 7), _zeros(0, 5), _zeros(40), _zeros(6, 16)]
    views = [(1, 4, 32), (1, 4, 7), (1, 0, 5), _flat(40), (1, 6, 16)]
    found = _launcher.tile_groups([xs], views, TILE, columns=[[10, 11, 12, 13, 14]],
                                  segments=[[1, 2, 3, 4, 5]])
    assert [idx for idx, _ in found] == [[0, 3, 4], [1]]
    aligned, unaligned = found[0][1], found[1][1]
    assert aligned.aligned and not unaligned.aligned
    user = _launcher.META_USER
    assert aligned.meta[:, user].tolist() == [10, 13, 14] and aligned.meta[:, user + 1].tolist() == [0, 1, 5]
    assert aligned.segment_sizes == (10,) and unaligned.segment_sizes == (2,)


def test_tile_plan_cache():
    xs = [_zeros(5, 7), _zeros(9, 17)]
    views = [(1, 5, 7), (1, 9, 17)]
    first = _launcher.tile_plan([xs], views, TILE, segments=[[3, 4]])
    assert _launcher.tile_plan([xs], views, TILE, segments=[[3, 4]]) is first
    assert _launcher.tile_plan([xs], views, TILE, segments=[[3, 5]]) is not first
    old = xs[1]
    xs[1] = _zeros(9, 17)
    assert xs[1].data_ptr() != old.data_ptr()
    assert _launcher.tile_plan([xs], views, TILE, segments=[[3, 4]]) is not first


def test_every_launch_goes_through_enqueue(monkeypatch):
    seen = []
    real = _launcher._enqueue
    monkeypatch.setattr(_launcher, "_enqueue",
                        lambda k, grid, *a, **kw: (seen.append(grid), real(k, grid, *a, **kw)))
    _increment([_zeros(n) for n in SIZES])
    xs = [_zeros(5, 7)]
    plan = _launcher.tile_plan([xs], [(1, 5, 7)], TILE)
    out = torch.empty(plan.n_blocks * 5, dtype=torch.int64, device=KERNEL_DEVICE)
    plan.launch(_tile_increment_kernel, out, num_warps=4)
    assert seen == [(sum((n + BLOCK - 1) // BLOCK for n in SIZES),), (plan.n_blocks,)]


def test_workspace_is_shared_and_grow_only():
    dev = KERNEL_DEVICE
    buf = _launcher.workspace("test.scratch", 10, dev)
    assert buf.device.type == dev.type and buf.dtype == torch.float32 and buf.numel() >= 10
    assert _launcher.workspace("test.scratch", 8, dev) is buf
    assert _launcher.workspace("test.other", 8, dev) is not buf
    grown = _launcher.workspace("test.scratch", buf.numel() + 1, dev)
    assert grown.numel() == buf.numel() + 1 and _launcher.workspace("test.scratch", 1, dev) is grown
    assert _launcher.workspace("test.scratch", 4, dev, torch.int64).dtype == torch.int64


def test_many_param_groups_keep_their_plans_between_steps(monkeypatch):
    """Forty param groups (layer-wise learning rates) stepped with the default inf/NaN check: after
    the first step no plan is built again (a 64-entry cache rebuilt every plan every step)."""
    import optimfx

    built = []
    original = _launcher._build
    monkeypatch.setattr(_launcher, "_build", lambda *a, **k: built.append(1) or original(*a, **k))
    params = [torch.nn.Parameter(torch.randn(8, device=KERNEL_DEVICE)) for _ in range(40)]
    opt = optimfx.AdamW([{"params": [p], "lr": 1e-3 * (i + 1)} for i, p in enumerate(params)], backend="triton")
    for step in range(3):
        for p in params:
            if p.grad is None:
                p.grad = torch.randn_like(p)
        opt.step()
        if step == 0:
            first = len(built)
    assert first > 0 and len(built) == first


def test_plan_cache_is_bounded_by_bytes(monkeypatch):
    monkeypatch.setattr(_launcher, "CACHE_BYTES", 4096)
    cache = _launcher.LRU()
    for i in range(10):
        cache.put(i, torch.zeros(256, dtype=torch.int32))  # 1 KiB each
    assert len(cache) == 4 and cache.nbytes == 4096
    assert cache.get(0) is None and cache.get(9) is not None
    cache.put("big", torch.zeros(2048, dtype=torch.int32))  # 8 KiB: kept alone, the newest
    assert len(cache) == 1 and cache.get("big") is not None
