r"""ChildTuning-masked gradients of a whole group, a cache-sized batch at a time (the CPU fast path).

:func:`~optimfx.reference.child_tuning.mask_grad` masks one tensor with about fifteen ATen ops and a
fresh full-size result: on 1024 tensors of 128² that is ~15 K ops a step, and a fresh 100 MB result
for a large embedding costs more in page faults than its arithmetic. Here a group's tensors are cut
into *segments* (flat element ranges of at most :data:`BATCH_NUMEL` elements), segments of equal
length are *batched* (rows of one ``[rows, length]`` buffer, at most :data:`BATCH_NUMEL` elements in
all), and a batch is masked with a fixed number of ops into buffers reused from step to step:

* ChildTuning-F: the pair hash of ``child_tuning`` for every row at once. A row of segment
  ``[o, o + n)`` of a tensor with keys ``(k0, k1)`` hashes pairs ``q = o/2 + i``, so
  ``(q + k0)·A = A·i + A·(o/2 + k0)`` is the shared ramp ``A·i`` plus a per-row constant, and
  ``(x + k1)·B = B·x + B·k1`` one broadcast ``add``; then ``g ⊙ keep / p`` as the per-tensor step
  computes it (``addcmul`` of the 0/1 comparison and the gradient);
* ChildTuning-D: ``g ⊙ M`` of the stacked rows and their stored masks.

The result is bitwise the per-tensor transform's (same hash, comparison and product; tested). Segments
need an even first element (pairs are hashed whole) and pair indices below 2^32; others, and the rows of
a big-endian machine, take the per-tensor functions. The consumer (ATen's fused Adam step,
``aten_fused.py``) reads each batch while it is still in cache.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from typing import NamedTuple, Optional

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
    """Segments grouped by length, each group cut into batches of at most ``max_numel`` (default
    :data:`BATCH_NUMEL`) elements, at least one segment each."""
    max_numel = max_numel or BATCH_NUMEL
    by_length: dict[int, list[Segment]] = defaultdict(list)
    for seg in segs:
        by_length[seg.length].append(seg)
    out: list[list[Segment]] = []
    for length, members in by_length.items():
        rows = max(1, max_numel // length)
        out.extend(members[s:s + rows] for s in range(0, len(members), rows))
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
    """Release this thread's batch buffers (the next masked step allocates them again)."""
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


def _bernoulli_batch(flat: list[Tensor], states: list[dict], hp: ct.MaskHyper, batch: list[Segment],
                     keys: dict[int, int]) -> list[Tensor]:
    length = batch[0].length
    n_pairs = (length + 1) >> 1
    offsets = [ct.element_offset(states[s.index]) + s.start for s in batch]
    hashed = [j for j, o in enumerate(offsets) if _hashable(o, n_pairs)]
    out: list[Optional[Tensor]] = [None] * len(batch)
    if hashed:
        device, dtype = flat[batch[0].index].device, flat[batch[0].index].dtype
        n_rows = len(hashed)
        bits = _pair_bits(n_pairs, [(_key(batch[j].index, states, hp, keys), offsets[j] >> 1) for j in hashed],
                          device)
        keep = _SCRATCH.take("masked", n_rows * length, dtype, device).view(n_rows, length)
        torch.lt(bits.view(torch.int16)[:, :length], ct._signed_threshold(hp.reserve_p), out=keep)
        zero = torch.zeros((), dtype=dtype, device=device)
        # one product per row (stacking the gradients first costs more than the calls)
        for j, grad, row in zip(hashed, rows(flat, [batch[j] for j in hashed]), keep.unbind(0)):
            out[j] = torch.addcmul(zero, row, grad, value=1.0 / hp.reserve_p, out=row)
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
    return x


def _fisher_batch(flat: list[Tensor], states: list[dict], batch: list[Segment]) -> list[Tensor]:
    """``g ⊙ M`` of the rows whose tensor has a stored mask, each written into a row of the reused
    buffer (one product per row: stacking the rows first costs more than the calls); the other rows
    are the gradient itself."""
    out = rows(flat, batch)
    masked = [j for j, s in enumerate(batch) if "child_mask" in states[s.index]]
    if masked:
        length = batch[0].length
        result = _SCRATCH.take("masked", len(masked) * length, out[masked[0]].dtype, out[masked[0]].device)
        for j, row in zip(masked, result.view(len(masked), length).unbind(0)):
            seg = batch[j]
            mask = states[seg.index]["child_mask"].view(-1)
            out[j] = torch.mul(out[j], mask if seg.length == mask.numel() else
                               mask[seg.start:seg.start + seg.length], out=row)
    return out
