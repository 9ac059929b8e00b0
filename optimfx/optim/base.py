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

from .. import _dispatch
from .._algorithm import Algorithm
from .._precision import compute_dtype, real_view
from .._validation import check_backend, check_lr

Tensor = torch.Tensor


class FxOptimizer(Optimizer):
    """Base class of the optimfx optimizers (not instantiated directly)."""

    algorithm: ClassVar[Algorithm]
    #: pointwise algorithms optimise a complex parameter as its real view; shape-dependent ones refuse
    supports_complex: ClassVar[bool] = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        check_lr(defaults["lr"])
        check_backend(defaults["backend"])
        # torch.optim's __setstate__ adds this key on load; having it from the start keeps
        # state_dict → load → state_dict identical
        defaults.setdefault("differentiable", False)
        super().__init__(params, defaults)
        self._warned_skip = False

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
                state.update(self.algorithm.init_state(real_view(p), hyper))
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
            backend = _dispatch.resolve_backend(group["backend"], params)
            stepped = _dispatch.run(self.algorithm, backend, params, grads, states, step_counts,
                                    hyper, group["lr"], group["skip_nonfinite"])
            if not stepped and not self._warned_skip:
                self._warned_skip = True
                warnings.warn(f"{type(self).__name__}: gradients hold inf/NaN; the step was skipped for "
                              "that parameter group (parameters and state unchanged). This warning is "
                              "shown once.", RuntimeWarning, stacklevel=2)
        return loss

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
