"""One multi-tensor launcher for every kernel: pointer tables and a block → (tensor, chunk) map.

A launch covers ``L`` aligned lists of ``T`` tensors each (parameters, gradients, state buffers;
tensor ``i`` of every list has the same number of elements). The launcher builds, per group of
tensors sharing (device, dtype of every list, 16-byte alignment):

* ``tables``: int64 ``[T, L]``, the ``data_ptr()`` of tensor ``i`` of list ``k`` at ``[i, k]``;
* ``numels``: int64 ``[T]``;
* ``block_tensor`` / ``block_chunk``: int32 ``[n_blocks]``, which tensor and which ``BLOCK``-sized
  chunk of it program ``pid`` handles (the ``TensorListMetadata`` idea of ATen's
  ``MultiTensorApply.cuh``, and the pointer-table idea of Triton's grouped-GEMM tutorial).

The kernel is launched once per group on a grid of ``n_blocks`` programs, never once per tensor.
Tables are cached by the tensors' addresses and sizes, so a step whose tensors did not move reuses
them; any change (``zero_grad(set_to_none=True)`` re-allocating a gradient, ``load_state_dict``,
``.to()``) rebuilds them.

Kernels that need a 2-D view of each tensor (row/column reductions) use a :class:`TilePlan`: every
tensor is seen as ``[slices, rows, cols]`` (row-major, the tensor's own memory order) and every
program is one ``BR × BC`` tile of one slice. On top of the tables above it carries an int64
``meta [T, NMETA]`` table: the columns of :data:`TILE_META`, then caller columns, then the offset of
each tensor in each caller-sized scratch *segment*. Several passes over the same tensors reuse one
plan; scratch comes from :func:`workspace`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from itertools import chain
from operator import attrgetter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import triton.language as tl

Tensor = torch.Tensor

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
#: bounds of each cache of device tables: entries, and bytes of the tensors they hold. A launch
#: group's plans are reused step after step while its tensors stay put; one optimizer with many param
#: groups needs a few per group (64 entries thrashed at 40 groups), and tables of stale addresses
#: (tensors reallocated) must not pile up: a 7 B-parameter group's block maps take ~27 MB
CACHE_ENTRIES = 1024
CACHE_BYTES = 256 << 20


def _nbytes(value: Any) -> int:
    """Bytes of the tensors ``value`` holds: a tensor, a plan's fields, or a list of either."""
    if isinstance(value, Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(map(_nbytes, value))
    fields = getattr(value, "__dataclass_fields__", None)
    return sum(_nbytes(getattr(value, f)) for f in fields) if fields else 0


class LRU:
    """A least-recently-used cache of device tables, bounded by :data:`CACHE_ENTRIES` entries and
    :data:`CACHE_BYTES` bytes of tensors (the newest entry is always kept). Safe to share between
    threads stepping optimizers (a lock around each look-up and insertion)."""

    def __init__(self) -> None:
        self._items: "OrderedDict[Any, tuple[Any, int]]" = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Any, value: Any) -> Any:
        size = _nbytes(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[key] = (value, size)
            self.nbytes += size
            while len(self._items) > 1 and (len(self._items) > CACHE_ENTRIES or self.nbytes > CACHE_BYTES):
                self.nbytes -= self._items.popitem(last=False)[1][1]
        return value


def cached(cache: LRU, key: Any, build: Any) -> Any:
    """``cache[key]``, built by ``build()`` on a miss (small device tables and plans, reused step
    after step)."""
    item = cache.get(key)
    return cache.put(key, build()) if item is None else item

#: leading columns of ``TilePlan.meta``, in order; the jit helper ``_common.tile_coords`` reads them
TILE_META = ("slices", "rows", "cols", "tiles_r", "tiles_c", "first", "tiles")
#: index of the first caller column of ``TilePlan.meta``
META_USER = len(TILE_META)
#: row lengths (in elements) that are multiples of this keep every row start 16-byte aligned
ROW_ALIGN = 16


@dataclass(frozen=True)
class MultiTensorPlan:
    """Device tables of one launch group (see module docstring)."""

    tables: Tensor
    numels: Tensor
    block_tensor: Tensor
    block_chunk: Tensor
    n_blocks: int
    dtypes: tuple[Any, ...]  # Triton element type of each list
    aligned: bool


#: plans by (block or tile, the tensors' addresses, sizes and dtypes)
_plans = LRU()


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _host_table(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _build(lists: Sequence[Sequence[Tensor]], block: int, aligned: bool) -> MultiTensorPlan:
    device = lists[0][0].device
    n_tensors = len(lists[0])
    ptrs = [lst[i].data_ptr() for i in range(n_tensors) for lst in lists]
    numels = [lists[0][i].numel() for i in range(n_tensors)]
    chunks = [(n + block - 1) // block for n in numels]
    block_tensor = [i for i, c in enumerate(chunks) for _ in range(c)]
    block_chunk = [j for c in chunks for j in range(c)]
    return MultiTensorPlan(
        tables=_host_table(ptrs, torch.int64, device).reshape(n_tensors, len(lists)),
        numels=_host_table(numels, torch.int64, device),
        block_tensor=_host_table(block_tensor, torch.int32, device),
        block_chunk=_host_table(block_chunk, torch.int32, device),
        n_blocks=len(block_tensor),
        dtypes=tuple(TL_DTYPES[lst[0].dtype] for lst in lists),
        aligned=aligned,
    )


_data_ptr, _numel = Tensor.data_ptr, Tensor.numel
_dtype_of = attrgetter("dtype")
_device_of = attrgetter("device")


@dataclass(frozen=True)
class Layout:
    """What a launch needs to know of its tensors, read once per launch (a few C calls per tensor):
    the address of every tensor of every list, the sizes and the dtypes. ``key`` identifies it."""

    ptrs: list[list[int]]
    numels: list[int]
    dtypes: list[list[torch.dtype]]
    key: "_Key"

    @classmethod
    def of(cls, lists: Sequence[Sequence[Tensor]]) -> "Layout":
        ptrs = [list(map(_data_ptr, lst)) for lst in lists]
        numels = list(map(_numel, lists[0]))
        dtypes = [list(map(_dtype_of, lst)) for lst in lists]
        key = _Key((lists[0][0].device, tuple(chain.from_iterable(ptrs)), tuple(numels),
                    tuple(tuple(d) for d in dtypes)))
        return cls(ptrs, numels, dtypes, key)


class _Key:
    """A cache key over thousands of addresses, hashed once (a tuple rehashes on every lookup)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: tuple) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self._hash == other._hash and self.value == other.value


def plan(lists: Sequence[Sequence[Tensor]], block: int, layout: Layout | None = None) -> MultiTensorPlan:
    """The cached plan for one launch group; every tensor must be contiguous and non-empty."""
    layout = layout or Layout.of(lists)
    key = (block, layout.key)
    found = _plans.get(key)
    if found is not None:
        return found
    aligned = not any(p % 16 for p in chain.from_iterable(layout.ptrs))
    return _plans.put(key, _build(lists, block, aligned))


def groups(lists: Sequence[Sequence[Tensor]], row_lengths: Sequence[int] | None = None,
           layout: Layout | None = None) -> list[list[int]]:
    """Split tensor indices into launch groups by (device, dtype of each list, alignment).

    With ``row_lengths`` (tile plans) a tensor counts as aligned only if its rows also start on
    16-byte boundaries (row length a multiple of :data:`ROW_ALIGN`). The usual case, one device,
    one dtype per list, every tensor aligned and non-empty, is decided from ``layout`` without a
    per-tensor loop in Python.
    """
    layout = layout or Layout.of(lists)
    n = len(layout.numels)
    if (0 not in layout.numels and all(len(set(d)) == 1 for d in layout.dtypes)
            and not any(p % 16 for p in chain.from_iterable(layout.ptrs))
            and (row_lengths is None or not any(r % ROW_ALIGN for r in row_lengths))
            and len(set(map(_device_of, lists[0]))) == 1):
        return [list(range(n))]
    out: dict[tuple, list[int]] = {}
    for i in range(n):
        if layout.numels[i] == 0:
            continue
        aligned = all(ptrs[i] % 16 == 0 for ptrs in layout.ptrs)
        if row_lengths is not None:
            aligned = aligned and row_lengths[i] % ROW_ALIGN == 0
        key = (lists[0][i].device, tuple(d[i] for d in layout.dtypes), aligned)
        out.setdefault(key, []).append(i)
    return list(out.values())


#: ``(block, layout key) → plans``: the launch groups of a whole launch, so that a step whose
#: tensors did not move decides nothing again
_launches = LRU()


def launch_plans(lists: Sequence[Sequence[Tensor]], block: int) -> list[MultiTensorPlan]:
    """The plans of every launch group of ``lists`` (cached by the tensors' addresses and sizes)."""
    layout = Layout.of(lists)
    key = (block, layout.key)
    found = _launches.get(key)
    if found is not None:
        return found
    plans = [plan([[lst[i] for i in idx] for lst in lists], block) for idx in groups(lists, layout=layout)]
    return _launches.put(key, plans)


def contiguous_or_copy(t: Tensor) -> Tensor:
    """Kernels address flat memory: non-contiguous inputs are read through a contiguous copy."""
    return t if t.is_contiguous() else t.contiguous()


def contiguous_list(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`contiguous_or_copy` of every tensor (the list itself, copied, when all are contiguous)."""
    if all(map(Tensor.is_contiguous, tensors)):
        return list(tensors)
    return [contiguous_or_copy(t) for t in tensors]


def launch(kernel: Any, lists: Sequence[Sequence[Tensor]], *args: Any, block: int, num_warps: int,
           **constexprs: Any) -> None:
    """Launch ``kernel`` once per launch group of ``lists``, over all of that group's tensors.

    The kernel's leading parameters are ``(tables, numels, block_tensor, block_chunk)``, then
    ``*args``, then constexprs ``DTYPES`` (one Triton dtype per list), ``ALIGNED`` and ``BLOCK``.
    """
    for p in launch_plans(lists, block):
        _enqueue(kernel, (p.n_blocks,), p.tables, p.numels, p.block_tensor, p.block_chunk, *args,
                 **{f"DTYPE{k}": dt for k, dt in enumerate(p.dtypes)},
                 ALIGNED=p.aligned, BLOCK=block, num_warps=num_warps, **constexprs)


def _enqueue(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """The one place a kernel is launched (tests count launches here)."""
    kernel[grid](*args, **kwargs)


_workspaces: dict[tuple, Tensor] = {}


def workspace(name: str, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Scratch of at least ``numel`` elements (contents undefined), shared by every launch.

    One grow-only buffer per ``(device, name, dtype)``: launches on a stream run in order, so groups
    and steps can take turns with it, and memory stays at the largest group's need (a plan-owned
    buffer would pin one per cached plan). After the first step the address no longer changes.
    """
    key = (torch.device(device), name, dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf


def device_scalar(value: Any, device: torch.device, cache: dict) -> Tensor:
    """A 1-element fp32 device tensor holding ``value`` (a float or a 1-element tensor).

    Tensor values are converted on the device (no host read); float values update a cached
    tensor with ``fill_`` only when they change, so a scheduler costs no allocation per step.
    """
    if isinstance(value, Tensor):
        return value.detach().reshape(1).to(device=device, dtype=torch.float32, non_blocking=True)
    slot = cache.get(device)
    if slot is None or slot[0] != value:
        t = slot[1] if slot is not None else torch.empty(1, dtype=torch.float32, device=device)
        t.fill_(value)
        cache[device] = (value, t)
        return t
    return slot[1]


@dataclass(frozen=True)
class TilePlan(MultiTensorPlan):
    """A plan whose programs are ``BR × BC`` tiles of ``[slices, rows, cols]`` views (module docstring).

    ``block_chunk`` holds the tile index inside its tensor, slice-major then row-major over tiles;
    ``meta[i, "first"]`` is the program id of tensor ``i``'s first tile, so per-tile partial results
    stored at ``pid`` are contiguous per tensor.
    """

    meta: Tensor
    n_tensors: int
    tile: tuple[int, int]
    segment_sizes: tuple[int, ...]

    def launch(self, kernel: Any, *args: Any, num_warps: int, per_tensor: bool = False,
               **constexprs: Any) -> None:
        """One launch over every tile (or, with ``per_tensor``, one program per tensor).

        The kernel's leading parameters are ``(tables, numels, block_tensor, block_chunk, meta)``,
        then ``*args``, then constexprs ``DTYPE<k>``, ``ALIGNED``, ``BR``, ``BC`` and ``NMETA``.
        ``ALIGNED`` also promises that every row length is a multiple of :data:`ROW_ALIGN`.
        """
        grid = (self.n_tensors,) if per_tensor else (self.n_blocks,)
        _enqueue(kernel, grid, self.tables, self.numels, self.block_tensor, self.block_chunk, self.meta,
                 *args, **{f"DTYPE{k}": dt for k, dt in enumerate(self.dtypes)},
                 ALIGNED=self.aligned, BR=self.tile[0], BC=self.tile[1], NMETA=self.meta.shape[1],
                 num_warps=num_warps, **constexprs)


def tile_counts(view: Sequence[int], tile: Sequence[int]) -> tuple[int, int]:
    """``(tiles_r, tiles_c)`` of a ``[slices, rows, cols]`` view."""
    return -(-view[1] // tile[0]), -(-view[2] // tile[1])


def _build_tiles(lists: Sequence[Sequence[Tensor]], views: Sequence[tuple[int, int, int]],
                 tile: tuple[int, int], columns: Sequence[Sequence[int]],
                 segments: Sequence[Sequence[int]], aligned: bool) -> TilePlan:
    device = lists[0][0].device
    n_tensors = len(views)
    rows, first = [], 0
    offsets = [0] * len(segments)
    for i, (slices, n_r, n_c) in enumerate(views):
        t_r, t_c = tile_counts((slices, n_r, n_c), tile)
        tiles = slices * t_r * t_c
        seg = []
        for k, sizes in enumerate(segments):
            seg.append(offsets[k])
            offsets[k] += sizes[i]
        rows.append([slices, n_r, n_c, t_r, t_c, first, tiles] + [c[i] for c in columns] + seg)
        first += tiles
    meta = torch.tensor(rows, dtype=torch.int64)
    tiles = meta[:, TILE_META.index("tiles")]
    # tensor-major block map, built vectorised (a large model has ~10^5 tiles)
    block_tensor = torch.repeat_interleave(torch.arange(n_tensors, dtype=torch.int32), tiles)
    starts = torch.repeat_interleave(meta[:, TILE_META.index("first")], tiles)
    block_chunk = (torch.arange(first, dtype=torch.int64) - starts).to(torch.int32)
    ptrs = [lst[i].data_ptr() for i in range(n_tensors) for lst in lists]
    return TilePlan(
        tables=_host_table(ptrs, torch.int64, device).reshape(n_tensors, len(lists)),
        numels=_host_table([t.numel() for t in lists[0]], torch.int64, device),
        block_tensor=_to_device(block_tensor, device),
        block_chunk=_to_device(block_chunk, device),
        n_blocks=first,
        dtypes=tuple(TL_DTYPES[lst[0].dtype] for lst in lists),
        aligned=aligned,
        meta=_to_device(meta, device),
        n_tensors=n_tensors,
        tile=tuple(tile),
        segment_sizes=tuple(offsets),
    )


def tile_plan(lists: Sequence[Sequence[Tensor]], views: Sequence[tuple[int, int, int]],
              tile: tuple[int, int], columns: Sequence[Sequence[int]] = (),
              segments: Sequence[Sequence[int]] = ()) -> TilePlan:
    """The cached tile plan of one launch group.

    ``views[i] = (slices, rows, cols)`` with ``slices·rows·cols ≥ numel`` of tensor ``i`` (a flat
    tensor may be viewed as ``(1, ceil(n / cols), cols)``; kernels mask flat offsets ``≥ numel``).
    ``columns``: extra int64 meta columns, each one value per tensor. ``segments``: scratch sizes,
    each one size per tensor; tensor ``i``'s offset in segment ``k`` is meta column
    ``META_USER + len(columns) + k`` and the segment's total is ``segment_sizes[k]``.
    """
    views = [tuple(int(x) for x in v) for v in views]
    columns = [tuple(int(x) for x in c) for c in columns]
    segments = [tuple(int(x) for x in s) for s in segments]
    key = ("tiles", tuple(tile), tuple((t.data_ptr(), t.numel(), t.dtype) for lst in lists for t in lst),
           tuple(views), tuple(columns), tuple(segments))
    found = _plans.get(key)
    if found is not None:
        return found
    aligned = (all(t.data_ptr() % 16 == 0 for lst in lists for t in lst)
               and all(v[2] % ROW_ALIGN == 0 for v in views))
    return _plans.put(key, _build_tiles(lists, views, tile, columns, segments, aligned))


def tile_groups(lists: Sequence[Sequence[Tensor]], views: Sequence[tuple[int, int, int]],
                tile: tuple[int, int], columns: Sequence[Sequence[int]] = (),
                segments: Sequence[Sequence[int]] = ()) -> list[tuple[list[int], TilePlan]]:
    """``(indices, plan)`` for every launch group of ``lists`` (empty tensors are left out).

    ``views``, ``columns`` and ``segments`` are given for all tensors, as in :func:`tile_plan`;
    each plan sees its own group's subset.
    """
    out = []
    for idx in groups(lists, [v[2] for v in views]):
        sub = [[lst[i] for i in idx] for lst in lists]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        out.append((idx, tile_plan(sub, pick(views), tile, [pick(c) for c in columns],
                                   [pick(s) for s in segments])))
    return out
