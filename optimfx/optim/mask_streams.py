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

from itertools import chain
from typing import Any, Iterable

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

    Args:
        params: the parameters in order, as tensors or as param-group dicts with a ``"params"`` list
            (the same forms an optimizer accepts).

    Raises:
        TypeError: an entry is not a tensor.
        ValueError: a parameter appears twice.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimfx.set_mask_streams(model.parameters())
    """
    entries = list(params)
    tensors = list(chain.from_iterable(e["params"] if isinstance(e, dict) else [e] for e in entries))
    seen: set[int] = set()
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"set_mask_streams: expected tensors or param-group dicts, got {type(t).__name__}")
        if id(t) in seen:
            raise ValueError("set_mask_streams: a parameter appears more than once")
        seen.add(id(t))
    for position, t in enumerate(tensors):
        _ASSIGNED[t] = position


def stream_of(param: Tensor, position: int) -> int:
    """The stream ``param`` draws from: its assigned number, else ``position`` in its optimizer."""
    return _ASSIGNED.get(param, position)
