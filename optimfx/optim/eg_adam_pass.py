r"""EG around optimfx's ``AdamW``/``AdaX`` on CPU: the base's step taken into EG's own pass.

Around any base, :class:`~optimfx.EGStepSize` saves ``θ``, lets the base write its proposal
``θ − d``, then reads ``d = θ_saved − (θ − d)`` back (``optimfx._kernels.cpu_eg``: ``adapt``, the
base's step, ``apply``). When the base is an optimfx optimizer whose CPU step is ATen's fused Adam
(:mod:`optimfx.reference.aten_fused`) and every tensor of a group goes to that kernel, EG instead
hands :func:`~optimfx.reference.aten_fused.steps_taken_by` an :class:`AdamPass`. The base's
``step()`` runs as always (its step counters, learning rate, bias corrections and scalars) but its
unmasked kernel calls come here, and one pass (``cpu_eg.adam_step``) does the gains, the average
gradient, Adam's moments, the proposal and EG's velocity and parameter update:

.. math::

    p \leftarrow \mathrm{clamp}(p\,e^{\mathrm{clip}(c\,m\odot g)}),\ m \leftarrow \mathrm{lerp}(m, g, 1-\beta),\
    q = \mathrm{Adam}(\theta, g),\ d = \theta - q,\ \nu \leftarrow \mu\nu + \eta\,p\odot d,\
    \theta \leftarrow q + (d - s\,\nu)

the same operations as the three passes, per element, in the same order: 52 B moved per fp32
element instead of 80 (sums aside), and no saved copy of the parameters.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import torch

from .. import _distributed
from .._dispatch import _host_lr, resolve_backend
from .._kernels import cpu_eg
from .._precision import real_view
from ..reference import aten_fused
from .base import FxOptimizer

Tensor = torch.Tensor


class _Pending(NamedTuple):
    hp: Any  # the unit's EGHyper
    grad: Tensor  # EG's gradient (maximize's sign applied)
    state: dict  # EG's state
    coefficient: float  # the gain coefficient c


def base_takes_part(base: Any, unit: Any, eg_checks_finite: bool) -> bool:
    """Whether the base's step of every tensor of ``unit`` (an ``EGStepSize`` unit the CPU kernels
    take) will be one unmasked call of ATen's fused Adam that :class:`AdamPass` can take over.

    Every condition under which the base would step a tensor otherwise is checked here, before
    anything is written: an optimfx base with :func:`~optimfx.reference.aten_fused.step_group`, the
    reference backend, no ChildTuning mask, no ``GradScaler`` driving the base, its state created
    and the kernel taking every tensor, a map for this step's scalars, no FSDP2 shards, and
    gradients EG has checked (the base then checks none and skips nothing)."""
    if not (eg_checks_finite and isinstance(base, FxOptimizer) and aten_fused.available()):
        return False
    if getattr(base, "grad_scale", None) is not None or getattr(base, "found_inf", None) is not None:
        return False
    arguments = aten_fused.arguments_map(base.algorithm)
    group = unit.group
    if arguments is None or resolve_backend(group["backend"], unit.params) != "reference":
        return False
    hyper = base.algorithm.hyper(group)
    if aten_fused.masked(hyper):
        return False
    lr = _host_lr(base._step_lr(group))  # as the base's step reads it
    steps = set()
    for owner, param, state in zip(unit.owners, unit.params, unit.states):
        base_state = base.state.get(owner)
        if not base_state or "step" not in base_state or _distributed.SHARD_KEY in state:
            return False
        if not (aten_fused.takes(param, real_view(owner.grad), base_state)
                and cpu_eg.takes_base_state(param, base_state)):
            return False
        steps.add(int(base_state["step"]) + 1)
    return all(arguments(hyper, base.algorithm.scalars(step, hyper), lr) is not None for step in steps)


class AdamPass:
    """The units whose base steps EG's kernel takes this step (:func:`base_takes_part`), and the
    :class:`~optimfx.reference.aten_fused.Takeover` that steps them."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}

    def add(self, unit: Any, grads: list[Tensor], coefficients: list[float]) -> bool:
        """Register ``unit``'s non-empty tensors (their scales already updated); ``False``, with nothing
        registered, when two tensors start at one address (views of one buffer: the base's calls
        name tensors by address here)."""
        entries = {param.data_ptr(): _Pending(unit.hp, grad, state, c)
                   for param, grad, state, c in zip(unit.params, grads, unit.states, coefficients) if param.numel()}
        if len(entries) < sum(1 for p in unit.params if p.numel()) or not entries.keys().isdisjoint(self._pending):
            return False
        self._pending.update(entries)
        return True

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __call__(self, params: list[Tensor], states: list[dict], args: aten_fused.FusedAdamArguments) -> set[int]:
        by_hyper: dict[Any, list[int]] = defaultdict(list)
        found: dict[int, _Pending] = {}
        for k, p in enumerate(params):
            entry = self._pending.pop(p.data_ptr(), None)
            if entry is not None:
                found[k] = entry
                by_hyper[entry.hp].append(k)
        for hp, ks in by_hyper.items():
            cpu_eg.adam_step([params[k] for k in ks], [found[k].grad for k in ks], [found[k].state for k in ks],
                             [states[k] for k in ks], [found[k].coefficient for k in ks], hp, args)
        return set(found)

    def check_done(self) -> None:
        """Every registered tensor was stepped (:func:`base_takes_part` foresaw the base's calls)."""
        if self._pending:
            raise RuntimeError(f"EGStepSize: the base stepped {len(self._pending)} tensor(s) outside its fused "
                               "Adam kernel, against what was checked before the step")
