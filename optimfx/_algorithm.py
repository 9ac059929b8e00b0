"""What the step skeleton and the dispatch need to know about one algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as seen by :class:`~optimfx.optim.base.FxOptimizer` and :mod:`optimfx._dispatch`.

    Attributes:
        name: kernel module name in ``optimfx._kernels`` and the key of compiled-function caches.
        state_names: per-parameter state buffers, each shaped like the parameter (real view), in the
            policy dtype of :mod:`optimfx._precision`, in the order the step functions take them.
        hyper: ``param_group -> hyperparameter record`` (hashable, read once per step).
        scalars: ``(step, hyper) -> host scalars`` in float64, shared by every backend.
        reference_step: ``(param, grad, *state, hyper, scalars, lr) -> None``, the specification.
    """

    name: str
    state_names: tuple[str, ...]
    hyper: Callable[[dict], Any]
    scalars: Callable[[int, Any], Any]
    reference_step: Callable[..., None]
