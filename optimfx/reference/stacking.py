"""The reference step of many small same-shape tensors, taken on stacks of them.

Each eager PyTorch op costs microseconds whatever its size, so an algorithm with many ops per tensor
(AdaFactor: about 30) spends most of a step on small tensors in per-op cost, not arithmetic. Tensors
that share a shape, dtype, device, step count and state layout are stacked on a new leading axis in
chunks of about :data:`CHUNK_BYTES` (the stacked copies stay in the CPU's caches while the step
reads them back), the algorithm's *stacked step* (each slice takes its own step) runs once per
chunk, and the parameters and state buffers are copied back with one foreach copy
each. The result equals the per-tensor step up to fp32 rounding (reductions may sum in another
order); both paths are tested against each other.

Left to the per-tensor loop: tensors over ``CHUNK_BYTES / 2``, empty ones, FSDP2 shards (their
reductions cross ranks), bf16 parameters written with stochastic rounding (keyed per tensor), and
shapes that occur once. ChildTuning masks (keyed per tensor) are applied before stacking.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterable, Optional

import torch

from .. import _distributed
from .._precision import compute_dtype, working_copy
from . import batched_masks
from . import child_tuning as ct

Tensor = torch.Tensor

#: bytes of fp32 parameter per chunk: measured on a 1 MiB-L2 CPU (1024 × 128², AdaFactor), 1 MiB
#: chunks stepped ~15 % faster than 0.5 or 2 MiB ones and 3–4x faster than tensor by tensor
CHUNK_BYTES = 1 << 20
#: tensors up to this many elements are stacked (at least two of them fit in a chunk)
MAX_STACKED_NUMEL = CHUNK_BYTES // 8


def is_buffer(value: Any) -> bool:
    """A state entry the step updates alongside the parameter (moments, factored statistics): a
    floating-point tensor. Step counters (int64), mask streams and ChildTuning's uint8 masks are
    per-tensor bookkeeping, never stacked."""
    return isinstance(value, Tensor) and value.is_floating_point()


def _stack_key(param: Tensor, grad: Tensor, state: dict, step: int) -> Optional[Hashable]:
    """What tensors must share to be stacked together, or ``None`` for one the loop steps alone.

    The state's keys stand for its layout: an algorithm's buffers are shaped by the parameter's
    shape and the group's options (``Algorithm.init_state``), and kept in the policy dtype.
    """
    numel = param.numel()
    if numel == 0 or numel > MAX_STACKED_NUMEL or _distributed.SHARD_KEY in state:
        return None
    return param.shape, param.dtype, param.device, grad.dtype, step, tuple(state)


def stack_groups(params: list[Tensor], grads: list[Tensor], states: list[dict], steps: list[int],
                 stochastic_bf16: bool) -> tuple[list[list[int]], list[int]]:
    """``(chunks, alone)``: index lists of the stacks to step (each at most ``CHUNK_BYTES`` of fp32
    parameter, at least two tensors) and the indices left to the per-tensor step."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    alone: list[int] = []
    for i, (p, g, state, step) in enumerate(zip(params, grads, states, steps)):
        key = None if stochastic_bf16 and p.dtype == torch.bfloat16 else _stack_key(p, g, state, step)
        (alone if key is None else groups[key]).append(i)
    chunks: list[list[int]] = []
    for members in groups.values():
        if len(members) < 2:
            alone.extend(members)
            continue
        per_chunk = max(2, CHUNK_BYTES // (4 * params[members[0]].numel()))
        chunks.extend(members[s:s + per_chunk] for s in range(0, len(members), per_chunk))
    return chunks, sorted(alone)


def _stacked(tensors: Iterable[Tensor], dtype: torch.dtype) -> Tensor:
    out = torch.stack(list(tensors))
    return out if out.dtype == dtype else out.to(dtype)


def _loaded_grads(grads: list[Tensor], states: list[dict], mask: ct.MaskHyper) -> Tensor:
    """The chunk's gradients stacked in the compute dtype, each ChildTuning-masked with its own key
    (all in one batch, ``batched_masks.py``)."""
    if mask.mode is None:
        return _stacked(grads, compute_dtype(grads[0].dtype))
    flat = [working_copy(g).reshape(-1) for g in grads]  # gradients may be non-contiguous (channels_last)
    batch = [batched_masks.Segment(i, 0, g.numel()) for i, g in enumerate(flat)]
    rows = batched_masks.masked_batch(flat, states, mask, batch, {})
    return torch.stack(rows).view((len(grads),) + grads[0].shape)


def step_chunk(step_fn: Callable[..., None], params: list[Tensor], grads: list[Tensor],
               states: list[dict], hyper: Any, scalars: Any, lr: float) -> None:
    """One stacked step of same-shape tensors: stack, step, copy parameters and buffers back.

    ``p.grad`` is only read (stacking copies it). The parameter stack keeps the parameters' dtype, so
    the step works in fp32 and rounds once into it, as it does for one tensor.
    """
    mask = getattr(hyper, "mask", ct.NO_MASK)
    grad_stack = _loaded_grads(grads, states, mask)
    if mask.mode is not None:
        hyper = dataclasses.replace(hyper, mask=ct.NO_MASK)
    # in the parameters' dtype: the step up-casts and rounds back as for one tensor, and reads
    # dtype-dependent defaults (torch's ε1 = machine epsilon of the parameter dtype) from it
    param_stack = torch.stack(params)
    keys = [k for k, v in states[0].items() if is_buffer(v)]
    state_stack = {k: torch.stack([s[k] for s in states]) for k in keys}
    step_fn(param_stack, grad_stack, state_stack, hyper, scalars, lr)
    torch._foreach_copy_(params, list(param_stack.unbind(0)))
    for k in keys:
        torch._foreach_copy_([s[k] for s in states], list(state_stack[k].unbind(0)))


def step_stacks(stacked_step: Callable[..., None], params: list[Tensor], grads: list[Tensor],
                states: list[dict], steps: list[int], hyper: Any, lr: float,
                scalars_of: Callable[[int], Any], stochastic_bf16: bool = False) -> list[int]:
    """Step every stackable tensor of a group on stacks; returns the indices still to step one by one
    (an ``Algorithm.group_step`` once ``stacked_step``, the algorithm's step over a stack, is bound).

    ``scalars_of(step)`` gives the host scalars of a step count; ``stochastic_bf16`` leaves bf16
    parameters (rounded stochastically, per tensor) to the per-tensor step.
    """
    chunks, alone = stack_groups(params, grads, states, steps, stochastic_bf16)
    for idx in chunks:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        step_chunk(stacked_step, pick(params), pick(grads), pick(states), hyper,
                   scalars_of(steps[idx[0]]), lr)
    return alone
