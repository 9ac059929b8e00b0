"""Which ChildTuning-F mask stream a parameter draws from: its position in the optimizer, or a number
the user assigned once for every optimizer (:func:`set_mask_streams`).

An F-mode mask is ``keep(seed, step, stream, element)`` (``reference/child_tuning.py``). By default
``stream`` is the parameter's position in the optimizer that steps it, which is stable across runs
and resumes, but depends on which parameters that optimizer holds: under
``torch.distributed.optim.ZeroRedundancyOptimizer`` each rank's optimizer holds only its partition
and numbers it from 0, so the draws differ from a single-process run (valid masks, identical on
every replica, yet not the same run). Numbering the model's parameters once, before any optimizer
steps them, makes every optimizer use the model's numbering.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

Tensor = torch.Tensor

#: parameter -> assigned stream number (weak: a freed parameter leaves no entry behind)
_ASSIGNED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def set_mask_streams(params: Iterable[Any]) -> None:
    """Number parameters for ChildTuning-F masks by their position in ``params``, for every optimizer.

    By default each optimizer numbers the parameters it holds (param groups in order, parameters in
    group order), so the same model and seed give the same masks in every run. When an optimizer
    holds only some of a model's parameters, as each rank's partition optimizer of
    ``ZeroRedundancyOptimizer`` does, call this once with the model's parameters before the first
    step: every optimfx optimizer and :class:`~optimfx.ChildTuning` adapter then draws the masks a
    single optimizer over ``params`` would draw.

    A parameter keeps the stream it stepped with first (it is saved in its state, so a checkpoint
    resumes with the same masks); numbers set later apply to parameters that have not stepped yet.
    An optimizer holding numbered and unnumbered parameters numbers the unnumbered ones after the
    largest number it holds, so no two of its tensors draw the same masks.

    Args:
        params: the parameters in order, in any form an optimizer accepts: tensors, ``(name, tensor)``
            pairs (``named_parameters()``), or param-group dicts whose ``"params"`` holds either.

    Raises:
        TypeError: an entry is not a tensor.
        ValueError: a parameter appears twice.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimfx.set_mask_streams(model.parameters())
    """
    tensors = _tensors(params)
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError("set_mask_streams: a parameter appears more than once")
    for position, t in enumerate(tensors):
        _ASSIGNED[t] = position


def _tensors(params: Iterable[Any]) -> list[Tensor]:
    """The tensors of ``params`` in order, from the forms ``torch.optim.Optimizer`` accepts."""
    out: list[Tensor] = []
    for entry in [params] if isinstance(params, (Tensor, dict)) else params:
        members = entry["params"] if isinstance(entry, dict) else [entry]
        for member in [members] if isinstance(members, Tensor) else members:
            if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str):
                member = member[1]  # a named parameter
            if not isinstance(member, Tensor):
                raise TypeError(f"set_mask_streams: expected tensors, (name, tensor) pairs or param-group "
                                f"dicts, got {type(member).__name__}")
            out.append(member)
    return out


def assign_streams(params: Sequence[Tensor], fixed: Sequence[Optional[int]]) -> list[int]:
    """The stream of each of an optimizer's parameters (``params`` in its order), keeping the ``fixed``
    ones (numbers already in their state, ``None`` where there is none yet).

    A new stream is the parameter's number from :func:`set_mask_streams`, else its position; when the
    optimizer holds numbered and unnumbered parameters, positions start after the largest number.
    A stream already taken in this optimizer (numbers from two separate calls, or set after other
    parameters stepped) is replaced by one past the largest taken, with a warning: two tensors with
    one stream would draw the same masks.
    """
    numbers = [_ASSIGNED.get(p) for p in params]
    assigned = [n for n in numbers if n is not None]
    offset = 1 + max(assigned) if assigned and len(assigned) < len(numbers) else 0
    taken = {f for f in fixed if f is not None}
    out: list[int] = []
    for position, (number, stream) in enumerate(zip(numbers, fixed)):
        if stream is None:
            stream = number if number is not None else position + offset
            if stream in taken:
                renumbered = max(taken) + 1
                warnings.warn(f"ChildTuning-F: two parameters of one optimizer would draw the same masks "
                              f"(mask stream {stream}); the one at position {position} draws stream "
                              f"{renumbered} instead. Number all of the optimizer's parameters in one "
                              "optimfx.set_mask_streams call (or none of them).", UserWarning, stacklevel=4)
                stream = renumbered
            taken.add(stream)
        out.append(stream)
    return out


def fix_streams(params: Sequence[Tensor], states: Sequence[Optional[dict]], which: Iterable[Tensor]) -> None:
    """Store ``state["mask_stream"]`` (an int64 CPU scalar) for each tensor of ``which`` that has a
    state and no stream yet; ``params`` are all of the optimizer's parameters in order and ``states``
    their state dicts (``None`` or empty before their first step)."""
    fixed = [int(st["mask_stream"]) if st and "mask_stream" in st else None for st in states]
    wanted = {id(p) for p in which}
    for p, state, old, stream in zip(params, states, fixed, assign_streams(params, fixed)):
        if old is None and state and id(p) in wanted:
            state["mask_stream"] = torch.tensor(stream, dtype=torch.int64)
