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
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import triton.language as tl

Tensor = torch.Tensor

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_CACHE_SIZE = 64


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


_plans: "OrderedDict[tuple, MultiTensorPlan]" = OrderedDict()


def _host_table(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


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


def plan(lists: Sequence[Sequence[Tensor]], block: int) -> MultiTensorPlan:
    """The cached plan for one launch group; every tensor must be contiguous and non-empty."""
    key = (block, tuple((t.data_ptr(), t.numel(), t.dtype) for lst in lists for t in lst))
    found = _plans.get(key)
    if found is not None:
        _plans.move_to_end(key)
        return found
    aligned = all(t.data_ptr() % 16 == 0 for lst in lists for t in lst)
    built = _build(lists, block, aligned)
    _plans[key] = built
    if len(_plans) > _CACHE_SIZE:
        _plans.popitem(last=False)
    return built


def groups(lists: Sequence[Sequence[Tensor]]) -> list[list[int]]:
    """Split tensor indices into launch groups by (device, dtype of each list, alignment)."""
    out: dict[tuple, list[int]] = {}
    for i in range(len(lists[0])):
        if lists[0][i].numel() == 0:
            continue
        key = (lists[0][i].device, tuple(lst[i].dtype for lst in lists),
               all(lst[i].data_ptr() % 16 == 0 for lst in lists))
        out.setdefault(key, []).append(i)
    return list(out.values())


def contiguous_or_copy(t: Tensor) -> Tensor:
    """Kernels address flat memory: non-contiguous inputs are read through a contiguous copy."""
    return t if t.is_contiguous() else t.contiguous()


def launch(kernel: Any, lists: Sequence[Sequence[Tensor]], *args: Any, block: int, num_warps: int,
           **constexprs: Any) -> None:
    """Launch ``kernel`` once per launch group of ``lists``, over all of that group's tensors.

    The kernel's leading parameters are ``(tables, numels, block_tensor, block_chunk)``, then
    ``*args``, then constexprs ``DTYPES`` (one Triton dtype per list), ``ALIGNED`` and ``BLOCK``.
    """
    for idx in groups(lists):
        sub = [[lst[i] for i in idx] for lst in lists]
        p = plan(sub, block)
        kernel[(p.n_blocks,)](
            p.tables, p.numels, p.block_tensor, p.block_chunk, *args,
            **{f"DTYPE{k}": dt for k, dt in enumerate(p.dtypes)},
            ALIGNED=p.aligned, BLOCK=block, num_warps=num_warps, **constexprs,
        )


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
