r"""ChildTuning-masked gradients of a whole group, a cache-sized batch at a time (the CPU fast path).

:func:`~optimfx.reference.child_tuning.mask_grad` masks one tensor with about fifteen ATen ops and a
fresh result: on 1024 tensors of 128² that is ~15 K ops a step. Here a group's tensors are cut into
*segments* (flat element ranges of at most :data:`BATCH_NUMEL` elements), sorted by length and packed
into *batches* of at most :data:`BATCH_NUMEL` elements, and a batch is masked into a buffer reused
from step to step, with a fixed number of ops per run of equal-length segments:

* ChildTuning-F: the pair hash of ``child_tuning`` for every row of a run at once. A row of segment
  ``[o, o + n)`` of a tensor with keys ``(k0, k1)`` hashes pairs ``q = o/2 + i``, so
  ``(q + k0)·A = A·i + A·(o/2 + k0)`` is the shared ramp ``A·i`` plus a per-row constant, and
  ``(x + k1)·B = B·x + B·k1`` one broadcast ``add``; then ``g ⊙ keep / p`` as the per-tensor step
  computes it (``addcmul`` of the 0/1 comparison and the gradient, one call per row);
* ChildTuning-D: ``g ⊙ M`` of each row and its stored mask, written into the buffer.

The result is bitwise the per-tensor transform's (same hash, comparison and product; tested). Tensors
are cut at multiples of :data:`BATCH_NUMEL`, a power of two: ATen's fused Adam kernel rounds its
vectorised body and its scalar tail differently, and cuts at multiples of every SIMD width keep each
element in the part it falls in uncut, so stepping the slices is bitwise stepping the whole tensor. Segments
need an even first element (pairs are hashed whole) and pair indices below 2^32; others, and the rows of
a big-endian machine, take the per-tensor functions. The consumer (ATen's fused Adam step,
``aten_fused.py``) reads each batch while it is still in cache.
"""

from __future__ import annotations

import sys
import threading
from typing import Iterator, NamedTuple, Optional

import torch

from . import child_tuning as ct

Tensor = torch.Tensor

#: elements per segment and per batch: 4 MiB of fp32 masked gradient (with the int32 hash buffer,
#: ~7 MiB of scratch per thread), in the L3 cache while the step reads it back
BATCH_NUMEL = 1 << 20
_PAIR_LIMIT = 1 << 32


class Segment(NamedTuple):
    """Elements ``start … start + length − 1`` of the flattened tensor ``index`` of a group."""

    index: int
    start: int
    length: int


def segments(numels: list[int], max_length: Optional[int] = None) -> list[Segment]:
    """Every tensor cut into consecutive segments of ``max_length`` (default :data:`BATCH_NUMEL`)
    elements, the last one shorter; empty tensors have none."""
    max_length = max_length or BATCH_NUMEL
    return [Segment(i, start, min(max_length, n - start))
            for i, n in enumerate(numels) for start in range(0, n, max_length)]


def batches(segs: list[Segment], max_numel: Optional[int] = None) -> list[list[Segment]]:
    """Segments sorted by length (stably) and packed in that order into batches of at most
    ``max_numel`` (default :data:`BATCH_NUMEL`) elements, at least one segment each: equal lengths
    are neighbours, so a batch holds runs of them."""
    max_numel = max_numel or BATCH_NUMEL
    out: list[list[Segment]] = []
    current: list[Segment] = []
    total = 0
    for seg in sorted(segs, key=lambda s: s.length):
        if current and total + seg.length > max_numel:
            out.append(current)
            current, total = [], 0
        current.append(seg)
        total += seg.length
    if current:
        out.append(current)
    return out


class _Scratch(threading.local):
    """Per-thread buffers grown to the largest batch: the masked rows (fp32), the hash words (int32)
    and the xorshift lanes (int64), each one flat tensor viewed per batch."""

    def __init__(self) -> None:
        self.flat: dict[tuple, Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (name, dtype, device)
        buf = self.flat.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.flat[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_SCRATCH = _Scratch()


def free_scratch() -> None:
    """Release this thread's batch buffers, about 8 MiB (the next masked step allocates them again)."""
    _SCRATCH.__init__()


def rows(flat: list[Tensor], batch: list[Segment]) -> list[Tensor]:
    """The slices of the flattened tensors ``flat`` that the segments of ``batch`` name."""
    out = []
    for seg in batch:
        t = flat[seg.index]
        out.append(t if seg.length == t.numel() else t[seg.start:seg.start + seg.length])
    return out


def masked_batch(flat_grads: list[Tensor], states: list[dict], hp: ct.MaskHyper, batch: list[Segment],
                 keys: dict[int, int]) -> list[Tensor]:
    """The masked gradient of each segment of ``batch`` (1-D tensors; rows of a reused buffer, valid
    until the next batch of this thread, or the gradient itself where nothing masks it).

    ``flat_grads`` are the group's working gradients (fp32, flattened; only read), ``keys`` caches
    each tensor's F-mode key (:func:`~optimfx.reference.child_tuning.mask_key`) across its segments.
    """
    if hp.bernoulli:
        return _bernoulli_batch(flat_grads, states, hp, batch, keys)
    if hp.mode == "D":
        return _fisher_batch(flat_grads, states, batch)
    return rows(flat_grads, batch)


def _key(i: int, states: list[dict], hp: ct.MaskHyper, keys: dict[int, int]) -> int:
    key = keys.get(i)
    if key is None:
        key = keys[i] = ct.mask_key(hp.seed, int(states[i]["mask_stream"]), int(states[i]["step"]))
    return key


def _runs(batch: list[Segment]) -> Iterator[list[int]]:
    """Positions in ``batch`` of each run of equal-length segments."""
    start = 0
    for j in range(1, len(batch) + 1):
        if j == len(batch) or batch[j].length != batch[start].length:
            yield list(range(start, j))
            start = j


def _bernoulli_batch(flat: list[Tensor], states: list[dict], hp: ct.MaskHyper, batch: list[Segment],
                     keys: dict[int, int]) -> list[Tensor]:
    """F masks: each run of equal-length rows hashed at once into a ``[rows, length]`` block of the
    reused buffer; rows that cannot be hashed in a run take :func:`child_tuning.bernoulli_grad`."""
    device, dtype = flat[batch[0].index].device, flat[batch[0].index].dtype
    offsets = [ct.element_offset(states[s.index]) + s.start for s in batch]
    buffer = _SCRATCH.take("masked", sum(s.length for s in batch), dtype, device)
    zero = torch.zeros((), dtype=dtype, device=device)
    out: list[Optional[Tensor]] = [None] * len(batch)
    used = 0
    for run in _runs(batch):
        length = batch[run[0]].length
        n_pairs = (length + 1) >> 1
        hashed = [j for j in run if _hashable(offsets[j], n_pairs)]
        if not hashed:
            continue
        bits = _pair_bits(n_pairs, [(_key(batch[j].index, states, hp, keys), offsets[j] >> 1) for j in hashed],
                          device)
        keep = buffer[used:used + len(hashed) * length].view(len(hashed), length)
        used += keep.numel()
        torch.lt(bits.view(torch.int16)[:, :length], ct._signed_threshold(hp.reserve_p), out=keep)
        # one product per row (stacking the gradients first costs more than the calls)
        for j, grad, row in zip(hashed, rows(flat, [batch[j] for j in hashed]), keep.unbind(0)):
            out[j] = torch.addcmul(zero, row, grad, value=ct.keep_scale(hp.reserve_p), out=row)
    for j, (seg, offset) in enumerate(zip(batch, offsets)):
        if out[j] is None:
            row = flat[seg.index][seg.start:seg.start + seg.length]
            out[j] = ct.bernoulli_grad(row, hp.reserve_p, _key(seg.index, states, hp, keys), offset)
    return out  # type: ignore[return-value]


def _hashable(offset: int, n_pairs: int) -> bool:
    """Whether a row's pairs can be hashed in a batch: whole pairs, one high word, little-endian."""
    return offset % 2 == 0 and (offset >> 1) + n_pairs <= _PAIR_LIMIT and sys.byteorder == "little"


def _pair_bits(n_pairs: int, keys_and_first_pairs: list[tuple[int, int]], device: torch.device) -> Tensor:
    """``[rows, n_pairs]`` int32 pair hashes (``child_tuning.pair_bits`` of each row's key from its
    first pair), in the reused hash buffer."""
    n_rows = len(keys_and_first_pairs)
    total = n_rows * n_pairs
    buf = _SCRATCH.take("hash", total + (total & 1), torch.int32, device)
    x = buf[:total].view(n_rows, n_pairs)
    starts = [ct._signed32(((first + (key & ct._M32)) & ct._M32) * ct.PAIR_MUL_A)
              for key, first in keys_and_first_pairs]
    ends = [ct._signed32((key >> 32) * ct.PAIR_MUL_B) for key, _ in keys_and_first_pairs]
    row_start = torch.tensor(starts, dtype=torch.int32, device=device).view(n_rows, 1)
    row_end = torch.tensor(ends, dtype=torch.int32, device=device).view(n_rows, 1)
    # x = (q + k0)·A = A·i + A·(first + k0)
    torch.add(ct._ramp(n_pairs, device).view(1, n_pairs), row_start, out=x)
    lanes = _SCRATCH.take("lanes", buf.numel() // 2, torch.int64, device)
    ct._xorshift16_(buf, lanes)
    # x = (x + k1)·B = B·x + B·k1
    torch.add(row_end, x, alpha=ct._signed32(ct.PAIR_MUL_B), out=x)
    ct._xorshift16_(buf, lanes)
    ct.final_round_(buf, lanes)
    return x


def _fisher_batch(flat: list[Tensor], states: list[dict], batch: list[Segment]) -> list[Tensor]:
    """``g ⊙ M`` of the rows whose tensor has a stored mask, each written into its slice of the reused
    buffer (one product per row: stacking the rows first costs more than the calls); the other rows
    are the gradient itself."""
    out = rows(flat, batch)
    masked = [j for j, s in enumerate(batch) if "child_mask" in states[s.index]]
    if masked:
        buffer = _SCRATCH.take("masked", sum(batch[j].length for j in masked), out[masked[0]].dtype,
                               out[masked[0]].device)
        used = 0
        for j in masked:
            seg = batch[j]
            mask = states[seg.index]["child_mask"].view(-1)
            row = buffer[used:used + seg.length]
            used += seg.length
            out[j] = torch.mul(out[j], mask if seg.length == mask.numel() else
                               mask[seg.start:seg.start + seg.length], out=row)
    return out
