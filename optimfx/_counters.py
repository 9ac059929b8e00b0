"""Step counters of a parameter group, advanced and read as one.

Every tensor's ``state["step"]`` is a 0-d int64 CPU tensor, as ``torch.optim`` keeps it, so
checkpoints, schedulers and code that reads the state see what they expect. Advancing and reading a
thousand separate 0-d tensors costs the host a few microseconds each per step, more than the whole
fused update of a small model on a GPU. So the counters of the tensors a group steps are views of
one int64 buffer: one ``add_`` advances them all and one ``tolist()`` reads them. The views are made
again (values kept) whenever the set of stepping tensors changes or a state dict is loaded; a
checkpoint stores each counter on its own (:func:`standalone_steps`).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

Tensor = torch.Tensor


class StepCounters:
    """The step counters of the tensors one ``step()`` updates in one group.

    Attributes:
        tensors: the counters, in the group's tensor order (``state["step"]`` of each).
        buffer: the int64 buffer they are views of, or ``None`` when they are separate tensors.
    """

    __slots__ = ("tensors", "buffer")

    def __init__(self, tensors: list[Tensor], buffer: Tensor | None = None) -> None:
        self.tensors = tensors
        self.buffer = buffer

    def advance(self, by: int = 1) -> None:
        """Add ``by`` to every counter (``-1`` takes a skipped step back)."""
        if self.buffer is not None:
            self.buffer.add_(by)
        elif self.tensors:
            torch._foreach_add_(self.tensors, by)

    def values(self) -> list[int]:
        """Every counter as a Python int."""
        if self.buffer is not None:
            return self.buffer.tolist()
        return [int(t) for t in self.tensors]

    def __len__(self) -> int:
        return len(self.tensors)


def group_counters(states: list[dict[str, Any]], cache: dict[int, StepCounters], key: int,
                   settle: Callable[[list[Tensor]], None]) -> StepCounters:
    """The counters of ``states`` as views of one buffer, reusing ``cache[key]`` while it still holds
    exactly these tensors (the same objects, in order); otherwise the states' counters are replaced
    by views of a new buffer holding their values, once ``settle`` has brought those values up to
    date (a step still in flight may have to be taken back)."""
    tensors = [s["step"] for s in states]
    found = cache.get(key)
    if found is not None and len(found.tensors) == len(tensors) and all(map(operator.is_, tensors, found.tensors)):
        return found
    settle(tensors)
    buffer = torch.tensor([int(t) for t in tensors], dtype=torch.int64)
    views = list(buffer.unbind(0))
    for state, view in zip(states, views):
        state["step"] = view
    counters = StepCounters(views, buffer)
    cache[key] = counters
    return counters


def standalone_steps(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every step counter that is a view of a group buffer replaced by its own
    0-d tensor (in new per-parameter dicts: the optimizer's live state is left as it is), so that a
    checkpoint writer that saves tensors one by one does not write the whole buffer for each."""
    state = state_dict["state"]
    for key, entry in state.items():
        step = entry.get("step")
        if isinstance(step, Tensor) and step._base is not None:
            state[key] = {**entry, "step": step.clone()}
    return state_dict
