"""``FxOptimizer``: the one step skeleton every optimfx optimizer runs.

A subclass provides ``algorithm`` (an :class:`~optimfx._algorithm.Algorithm`), its hyperparameter
validation and its docstring; it holds no maths. ``step()`` gathers each group's tensors, creates
state lazily, and hands the group to :func:`optimfx._dispatch.run`.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch.optim import Optimizer

from .. import _dispatch, _distributed
from .._algorithm import Algorithm
from .._precision import BF16_ROUNDINGS, compute_dtype, real_view
from .._validation import check_backend, check_choice, check_lr

Tensor = torch.Tensor


class FxOptimizer(Optimizer):
    """Base class of the optimfx optimizers (not instantiated directly)."""

    algorithm: ClassVar[Algorithm]
    #: pointwise algorithms optimise a complex parameter as its real view; shape-dependent ones refuse
    supports_complex: ClassVar[bool] = True
    #: state keys that average the parameter over one axis (``{key: axis}``), for their placement
    #: on FSDP2 (DTensor) parameters; see :mod:`optimfx._distributed`
    reduced_state_axes: ClassVar[dict[str, int]] = {}
    #: ``torch.amp.GradScaler`` hands its ``grad_scale`` and ``found_inf`` to ``step()`` (as attributes)
    #: instead of unscaling and checking the gradients itself; see ``_dispatch.run``
    _step_supports_amp_scaling: ClassVar[bool] = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        check_lr(defaults["lr"])
        check_backend(defaults["backend"])
        # torch.optim's __setstate__ adds this key on load; having it from the start keeps
        # state_dict → load → state_dict identical
        defaults.setdefault("differentiable", False)
        # group options of every optimizer: how bf16 parameters are written (to "nearest" even, or
        # "stochastic"), and the seed of the stochastic rounding
        defaults.setdefault("bf16_rounding", "nearest")
        defaults.setdefault("rounding_seed", 0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_choice("bf16_rounding", group["bf16_rounding"], BF16_ROUNDINGS)
        self._warned_skip = False
        # a Triton step's skip flag is read back lazily; a checkpoint must see the settled counters
        self.register_state_dict_pre_hook(_settle_step_counters)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # keep checkpoints written before an option existed loadable
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_warned_skip", False)

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Tensor]], step_counts: list[Tensor], hyper: Any) -> None:
        """Collect the tensors of ``group`` that have gradients, creating their state on first use."""
        name = type(self).__name__
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if (p.is_complex() or grad.is_complex()) and not self.supports_complex:
                raise RuntimeError(f"{name} does not support complex parameters or gradients")
            if p.is_complex() != grad.is_complex():
                raise RuntimeError(f"{name}: gradient and parameter must both be real or both complex")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.int64)
                state.update(_distributed.init_state(self.algorithm.init_state, real_view(p), hyper,
                                                     self.reduced_state_axes))
            elif not (isinstance(state["step"], Tensor) and state["step"].dtype == torch.int64
                      and state["step"].device.type == "cpu"):
                # a checkpoint may carry a float, a Python number or a device tensor
                state["step"] = torch.tensor(int(state["step"]), dtype=torch.int64)
            params.append(real_view(p))
            grads.append(real_view(grad))
            states.append(state)
            step_counts.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            states: list[dict[str, Tensor]] = []
            step_counts: list[Tensor] = []
            hyper = self.algorithm.hyper(group)
            self._init_group(group, params, grads, states, step_counts, hyper)
            if not params:
                continue
            skip_nonfinite, finite = group["skip_nonfinite"], True
            local = _distributed.local_group(params, grads, states, self.reduced_state_axes)
            if local is not None:
                # FSDP2: step the local shards; skip on every rank when any rank's shard is not finite
                params, grads, states = local
                finite = not skip_nonfinite or _distributed.all_finite(grads, states)
                skip_nonfinite = False
            backend = _dispatch.resolve_backend(group["backend"], params)
            stepped = finite and _dispatch.run(self.algorithm, backend, params, grads, states, step_counts,
                                               hyper, group["lr"], skip_nonfinite,
                                               **self._precision_options(group))
            if not stepped and not self._warned_skip:
                self._warned_skip = True
                warnings.warn(f"{type(self).__name__}: gradients hold inf/NaN; the step was skipped for "
                              "that parameter group (parameters and state unchanged). This warning is "
                              "shown once.", RuntimeWarning, stacklevel=2)
        return loss

    def _precision_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """GradScaler's ``grad_scale``/``found_inf`` (set on the optimizer around ``step()`` when it
        drives the step) and the group's bf16 rounding, as keywords of :func:`_dispatch.run`."""
        stochastic = group.get("bf16_rounding", "nearest") == "stochastic"
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None),
                "rounding_seed": int(group.get("rounding_seed", 0)) if stochastic else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state, keeping optimfx's state dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype,
        which would turn fp32 statistics of a bf16 model into bf16. Here floating state is restored
        in the precision policy's dtype (fp32, or fp64 for fp64 parameters) from the saved values.
        """
        # restore from the dict torch actually loads: the one the user's load pre-hooks returned
        # (a hook registered now runs after all of them)
        hooked: dict[str, Any] = {}
        handle = self.register_load_state_dict_pre_hook(lambda _, sd: hooked.update(sd=sd))
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        state_dict = hooked["sd"]
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        current = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, current):
            if saved_id not in saved_state:
                continue
            for key, value in saved_state[saved_id].items():
                if not isinstance(value, Tensor):
                    continue
                if key == "step":
                    # the saved counter may belong to a live optimizer that increments it in place
                    self.state[p][key] = value.detach().clone()
                    continue
                dtype = compute_dtype(p.dtype) if value.is_floating_point() else value.dtype
                restored = value.detach().to(device=p.device, dtype=dtype)
                # ``.to`` returns the saved buffer itself when nothing changes: never share it
                same = restored.data_ptr() == value.data_ptr()
                self.state[p][key] = restored.clone() if same else restored


def _settle_step_counters(optimizer: Optimizer) -> None:
    _dispatch.settle_skips([s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), Tensor)])
