"""What the step skeleton and the dispatch need to know about one algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as seen by :class:`~optimfx.optim.base.FxOptimizer` and :mod:`optimfx._dispatch`.

    Attributes:
        name: kernel module name in ``optimfx._kernels`` and the key of compiled-function caches.
        init_state: ``(param, hyper) -> {name: tensor}``, the per-parameter state buffers (besides
            ``step``) for a parameter (its real view for complex ones), in the policy dtype of
            :mod:`optimfx._precision`. Keys may depend on the shape (AdaFactor's factored state).
        hyper: ``param_group -> hyperparameter record`` (hashable, read once per step).
        scalars: ``(step, hyper) -> host scalars`` in float64, shared by every backend.
        reference_step: ``(param, grad, state, hyper, scalars, lr) -> None``, the specification;
            ``state`` is the parameter's state dict, updated in place.
        group_step: ``(params, grads, states, steps, hyper, lr, scalars_of, stochastic_bf16) ->
            indices left``, or ``None``: the reference backend's step of the tensors of a group it
            can take together, faster than one by one and equal to the reference step to rounding
            (AdaFactor: its C kernel on CPU, ``optimfx/reference/adafactor_cpu.py``, and stacks of
            small same-shape tensors, ``optimfx/reference/stacking.py``;
            AdaX and AdamW: ATen's fused Adam kernel on CPU, ``optimfx/reference/aten_fused.py``).
            The tensors whose indices it returns take ``reference_step`` one by one.
        group_step_checks_finite: ``group_step`` also takes ``check_finite``: with it set, it makes
            sure that no gradient of the group holds inf/NaN (its kernel's first pass reading them
            anyway, AdaFactor's on CPU) and returns ``None``, having written nothing, when one does;
            the dispatch then does not read the gradients once more for the group's check.
    """

    name: str
    init_state: Callable[[Any, Any], dict]
    hyper: Callable[[dict], Any]
    scalars: Callable[[int, Any], Any]
    reference_step: Callable[..., None]
    group_step: Optional[Callable[..., Optional[list[int]]]] = None
    group_step_checks_finite: bool = False
