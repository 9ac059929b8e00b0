"""``FxOptimizer``: the one step skeleton every optimfx optimizer runs.

A subclass provides ``algorithm`` (an :class:`~optimfx._algorithm.Algorithm`), its hyperparameter
validation and its docstring; it holds no maths. ``step()`` gathers each group's tensors, creates
state lazily, and hands the group to :func:`optimfx._dispatch.run`.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial
from itertools import chain
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch.optim import Optimizer

from .. import _dispatch, _distributed
from .._algorithm import Algorithm
from .._counters import StepCounters, group_counters, standalone_steps
from .._precision import BF16_ROUNDINGS, real_view, restored_state
from .._validation import (apply_checks, check_backend, check_choice, check_loaded_groups, check_lr,
                           check_nonnegative)

Tensor = torch.Tensor


def _checked_lr(value: Any) -> Any:
    check_lr(value)
    return value


#: the group checks every optimfx optimizer applies (:attr:`FxOptimizer.group_checks` adds to them)
GROUP_CHECKS: dict[str, Callable[[Any], Any]] = {
    "lr": _checked_lr,
    "weight_decay": partial(check_nonnegative, "weight_decay"),
    "backend": check_backend,
    "bf16_rounding": partial(check_choice, "bf16_rounding", choices=BF16_ROUNDINGS),
}


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
    #: set by :meth:`gradients_known_finite` while a wrapper that checked these gradients steps this one
    _known_finite: bool = False

    #: checks of the hyperparameters a param group may set for itself, ``key → check`` (the check
    #: returns the value to store, or raises ``ValueError`` naming the argument): applied to every
    #: group given to the constructor or to :meth:`add_param_group`, as to the constructor's own
    #: arguments (``torch.optim`` checks only those), with the same checks the constructor's defaults
    #: go through. Classes add their own to :data:`GROUP_CHECKS`.
    group_checks: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    #: group keys of other optimizers' checkpoints this one reads as its own (``_validation.FAMILY_KEYS``:
    #: a checkpoint with any other family's key is refused by :meth:`load_state_dict`)
    accepted_checkpoint_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        # torch.optim's __setstate__ adds this key on load; having it from the start keeps
        # state_dict → load → state_dict identical
        defaults.setdefault("differentiable", False)
        # group options of every optimizer: how bf16 parameters are written (to "nearest" even, or
        # "stochastic"), and the seed of the stochastic rounding
        defaults.setdefault("bf16_rounding", "nearest")
        defaults.setdefault("rounding_seed", 0)
        apply_checks(defaults, {**GROUP_CHECKS, **self.group_checks})
        super().__init__(params, defaults)
        self._warned_skip = False
        self._step_counters: dict[int, StepCounters] = {}
        self._register_state_dict_hooks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checking the hyperparameters it sets as the constructor checks its own."""
        apply_checks(param_group, {**GROUP_CHECKS, **self.group_checks})
        with warnings.catch_warnings():
            # torch warns that duplicates will be an error in future: here they are one now
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with duplicate parameters")
            super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len({id(p) for p in params}) != len(params):
            self.param_groups.pop()
            raise ValueError(f"{type(self).__name__}: a param group holds the same parameter twice (it would "
                             "take two updates a step with one step count); list each parameter once")

    def _register_state_dict_hooks(self) -> None:
        """A Triton step's skip flag is read back lazily; a checkpoint must see the settled counters,
        each saved on its own. Pickling (``copy.deepcopy``) drops hooks, so ``__setstate__`` calls
        this again."""
        if _settle_step_counters not in self._optimizer_state_dict_pre_hooks.values():
            self.register_state_dict_pre_hook(_settle_step_counters)
        if _standalone_steps not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(_standalone_steps)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # keep checkpoints written before an option existed loadable
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_warned_skip", False)
        self.__dict__.setdefault("_step_counters", {})
        self._register_state_dict_hooks()

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Tensor]], hyper: Any) -> None:
        """Collect the tensors of ``group`` that have gradients, creating their state on first use."""
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if p.is_complex() or grad.is_complex():
                self._check_complex(p, grad)
                p, grad = real_view(p), real_view(grad)
            if not state:
                self._init_state(state, p, hyper)
            params.append(p)
            grads.append(grad)
            states.append(state)

    def _check_complex(self, p: Tensor, grad: Tensor) -> None:
        name = type(self).__name__
        if not self.supports_complex:
            raise RuntimeError(f"{name} does not support complex parameters or gradients")
        if p.is_complex() != grad.is_complex():
            raise RuntimeError(f"{name}: gradient and parameter must both be real or both complex")

    def _init_state(self, state: dict[str, Tensor], p: Tensor, hyper: Any) -> None:
        """First step of ``p`` (its real view): an int64 CPU step counter and the algorithm's buffers."""
        state["step"] = torch.zeros((), dtype=torch.int64)
        state.update(_distributed.init_state(self.algorithm.init_state, p, hyper, self.reduced_state_axes))

    @contextlib.contextmanager
    def gradients_known_finite(self) -> Iterator[None]:
        """Within it, ``step()`` does not check the gradients for inf/NaN: the caller has just checked
        these very gradients (:class:`~optimfx.EGStepSize` does, before it runs its base), so a second
        full read of them would change nothing."""
        self._known_finite = True
        try:
            yield
        finally:
            del self._known_finite

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
            hyper = self.algorithm.hyper(group)
            self._init_group(group, params, grads, states, hyper)
            if not params:
                continue
            step_counts = group_counters(states, self._step_counters, id(group), _dispatch.settle_skips)
            skip_nonfinite, finite = group["skip_nonfinite"] and not self._known_finite, True
            local = _distributed.local_group(params, grads, states, self.reduced_state_axes)
            if local is not None:
                # FSDP2: step the local shards; skip on every rank when any rank's shard is not finite
                params, grads, states = local
                finite = not skip_nonfinite or _distributed.all_finite(grads, states)
                skip_nonfinite = False
            options = self._precision_options(group)
            if local is not None and options["found_inf"] is not None:
                # a plain GradScaler checks each rank's own shards: every rank must take one decision
                # (on a copy: the scaler's flag is its own)
                options["found_inf"] = _distributed.any_rank_(options["found_inf"].clone(),
                                                              [s.get(_distributed.SHARD_KEY) for s in states])
            backend = _dispatch.resolve_backend(group["backend"], params)
            stepped = finite and _dispatch.run(self.algorithm, backend, params, grads, states, step_counts,
                                               hyper, self._step_lr(group), skip_nonfinite, **options)
            if not stepped and not self._warned_skip:
                self._warned_skip = True
                warnings.warn(f"{type(self).__name__}: gradients hold inf/NaN; the step was skipped for "
                              "that parameter group (parameters and state unchanged). This warning is "
                              "shown once.", RuntimeWarning, stacklevel=2)
        return loss

    def _step_lr(self, group: dict[str, Any]) -> Any:
        """The lr this step applies to ``group``: its ``lr`` (AdaFactor may set it aside)."""
        return group["lr"]

    def _precision_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """GradScaler's ``grad_scale``/``found_inf`` (set on the optimizer around ``step()`` when it
        drives the step) and the group's bf16 rounding, as keywords of :func:`_dispatch.run`."""
        stochastic = group.get("bf16_rounding", "nearest") == "stochastic"
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None),
                "rounding_seed": int(group.get("rounding_seed", 0)) if stochastic else None}

    def _check_loaded_values(self) -> None:
        """The loaded groups' hyperparameters pass the constructor's checks (normalised as it stores
        them): a checkpoint of another optimizer fails here, naming the value, not at the first step."""
        checks = {**GROUP_CHECKS, **self.group_checks}
        for i, group in enumerate(self.param_groups):
            try:
                apply_checks(group, checks)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{type(self).__name__}.load_state_dict: param group {i} of the checkpoint: "
                                 f"{err}") from err

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state, keeping optimfx's state dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype,
        which would turn fp32 statistics of a bf16 model into bf16. Here floating state is restored
        in the precision policy's dtype (fp32, or fp64 for fp64 parameters) from the saved values.
        """
        # restore from the dict torch actually loads: the one the user's load pre-hooks returned
        # (a hook registered now runs after all of them)
        hooked: dict[str, Any] = {}

        def keep(_: Optimizer, sd: dict[str, Any]) -> None:
            check_loaded_groups(type(self).__name__, sd, self.defaults, self.accepted_checkpoint_keys)
            hooked.update(sd=sd)

        handle = self.register_load_state_dict_pre_hook(keep)
        # torch.optim builds new state and groups and __setstate__ replaces other attributes (pending
        # ChildTuning-D masks): the previous objects stay whole, to be put back
        before = dict(self.__dict__)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        try:
            self._check_loaded_values()
        except ValueError:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        state_dict = hooked["sd"]
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        current = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, current):
            if saved_id not in saved_state:
                continue
            for key, value in saved_state[saved_id].items():
                if key == "step" and isinstance(value, (Tensor, int, float)):
                    # an int64 CPU counter whatever the checkpoint holds (a float or device tensor from
                    # another optimizer); never the saved tensor itself, which a live optimizer may
                    # still increment in place
                    self.state[p][key] = torch.tensor(int(value), dtype=torch.int64)
                    continue
                if isinstance(value, Tensor):
                    self.state[p][key] = restored_state(value, p)


def _standalone_steps(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    return standalone_steps(state_dict)


def _settle_step_counters(optimizer: Optimizer) -> None:
    _dispatch.settle_skips([s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), Tensor)])
