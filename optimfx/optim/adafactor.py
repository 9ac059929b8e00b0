"""AdaFactor: validation, state layout and documentation (maths in ``reference/adafactor.py``)."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _distributed
from .._algorithm import Algorithm
from .._precision import compute_dtype
from .._validation import check_choice, check_nonnegative, check_range, check_torch_flags
from ..reference import adafactor as ref
from ..reference import adafactor_cpu
from . import adafactor_checkpoints
from .base import FxOptimizer, _checked_lr
from .gradient_masks import MASK_GROUP_CHECKS, GradientMaskMixin, documented

Tensor = torch.Tensor

ADAFACTOR = Algorithm(
    name="adafactor",
    init_state=ref.init_state,
    hyper=ref.AdaFactorHyper.from_group,
    scalars=ref.host_scalars,
    reference_step=ref.step_,
    group_step=functools.partial(adafactor_cpu.step_group, functools.partial(ref.step_, stacked=True)),
    group_step_checks_finite=True,
)


#: a param-group key set when ``transformers``' ``AdafactorSchedule`` reads the group's step size
#: (:meth:`AdaFactor._get_lr`): the group's ``lr`` then holds the value that scheduler logs, and a
#: relative-step group does not apply it (``transformers``' Adafactor ignores it there)
LOGGED_LR_KEY = "lr_is_logged_step_size"


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check`` for a hyperparameter that may also be ``None``."""
    return lambda value: None if value is None else check(value)


@documented
class AdaFactor(GradientMaskMixin, FxOptimizer):
    r"""AdaFactor: factored second moment, update clipping and relative step size.

    Accepts the keyword names and defaults of ``transformers.optimization.Adafactor``; the defaults
    run the paper's algorithm.

    .. math::

        \rho_t &= \min(10^{-2}, 1/\sqrt t), \qquad \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t\\
        R_t &= \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\,\mathrm{mean}_j(G_t^2 + \epsilon_1),\quad
        C_t = \hat\beta_{2t} C_{t-1} + (1-\hat\beta_{2t})\,\mathrm{mean}_i(G_t^2 + \epsilon_1),\quad
        \hat\beta_{2t} = 1 - t^{-0.8}\\
        U_t &= G_t / \sqrt{R_t C_t^\top / \bar R_t}, \qquad
        \theta_t = \theta_{t-1} - \alpha_t\, U_t / \max(1, \mathrm{RMS}(U_t)/d)

    Tensors with ``ndim ≥ 2`` are factored on their last two axes (each leading index separately);
    others keep a full second moment ``V``.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: ``None`` (default) with ``relative_step=True``: the paper's relative step, and the group's
            ``lr`` is stored as ``1.0``, a multiplier that LR schedulers scale. A number with
            ``relative_step=False``: the step size ρ_t itself (before the parameter scale). With
            ``lr_mode="rho_max"`` and ``relative_step=True`` it caps ρ_t as in ``torch.optim.Adafactor``.
            A param group's own lr follows the same rule: with the relative step on (and
            ``lr_mode="scale"``) a group may give ``lr=None`` but no number, which ``transformers``
            would ignore and this class would apply as a multiplier.
        eps: ``(ε1, ε2)``: ε1 regularises the squared gradient, ε2 floors the parameter RMS.
            Default: ``(1e-30, 1e-3)``. ``ε1=None`` is allowed with ``eps_mode="torch"`` (machine
            epsilon of the parameter dtype).
        clip_threshold: update-clipping threshold ``d``. Default: ``1.0``.
        decay_rate: :math:`-c` in :math:`\hat\beta_{2t} = 1 - t^{-c}`. Default: ``-0.8``.
        beta1: momentum on the scaled, clipped update (reference-code placement; not in the paper's
            final algorithm). Default: ``None`` (off).
        weight_decay: λ. Default: ``0.0``.
        scale_parameter: multiply the step by ``max(ε2, RMS(θ))``. Default: ``True``.
        relative_step: use ``ρ_t = min(1e-2, 1/√t)``. Default: ``True``.
        warmup_init: ``ρ_t = min(1e-6·t, 1/√t)`` (needs ``relative_step``). Default: ``False``.
        min_dim_size_to_factor: factor only when both of the last two dims are at least this large
            (``128`` gives the T5/optax behaviour for small matrices). Default: ``None`` (factor every
            tensor with ``ndim ≥ 2``, as transformers and torch).
        beta2_cap: cap on :math:`\hat\beta_{2t}` (e.g. ``0.999``) so long runs keep adapting.
            Default: ``None`` (paper).
        lr_mode: ``"scale"`` (lr multiplies :math:`\rho_t`) or ``"rho_max"``
            (:math:`\rho_t = \min(\mathrm{lr}, 1/\sqrt t)`, torch). Default: ``"scale"``.
        eps_mode: ``"paper"`` (ε1 added to ``G²``) or ``"torch"`` (ε1 clamps ``R̄`` and ``V̂``).
            Default: ``"paper"``.
        decay_mode: ``"hf"`` (``θ −= λ·α_t·θ``) or ``"torch"`` (``θ *= 1 − lr·λ``; needs a real lr:
            ``relative_step=False`` or ``lr_mode="rho_max"``). Default: ``"hf"``.
        {child_tuning}
        maximize: ascend the objective. Default: ``False``.
        skip_nonfinite: skip a group's step when its gradients hold inf/NaN. Default: ``True``.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"compiled"``. Default: ``"auto"``.
        foreach: ``torch.optim.Adafactor``'s flag, accepted and ignored (optimfx picks its fused path).

    Note:
        ``transformers.optimization.AdafactorSchedule`` works on this optimizer as on
        ``transformers``' Adafactor: it logs the step size :math:`\alpha_t` (:meth:`_get_lr`), and
        the values it writes into a relative-step group's ``lr`` are not applied. Before the
        scheduler's first read, the ``initial_lr`` it wrote at construction (``0.0`` by default)
        multiplies the relative step; ``AdafactorSchedule(opt, initial_lr=1.0)`` keeps the first
        step as well.

    Note:
        ``torch.optim.Adafactor(lr=a, eps=(None, e2), d=d, beta2_decay=c, weight_decay=w)`` is
        reproduced by ``AdaFactor(lr=a, eps=(None, e2), clip_threshold=d, decay_rate=c,
        weight_decay=w, lr_mode="rho_max", eps_mode="torch", decay_mode="torch")``.

    Example:
        >>> model = torch.nn.Linear(16, 8)
        >>> opt = optimfx.AdaFactor(model.parameters())
        >>> model(torch.randn(4, 16)).square().mean().backward()
        >>> opt.step()

    References:
        Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
        <https://arxiv.org/abs/1804.04235>`_, 2018.
    """

    algorithm = ADAFACTOR
    supports_complex = False
    group_checks = {
        **MASK_GROUP_CHECKS,
        "lr": _checked_lr,  # a group's lr=None is read as the constructor's (add_param_group)
        # any d > 0, as transformers' (below 1 clips harder; the paper uses 1)
        "clip_threshold": functools.partial(check_range, "clip_threshold", low=0.0, high=float("inf"), low_open=True),
        "decay_rate": functools.partial(check_range, "decay_rate", low=float("-inf"), high=0.0, high_open=True),
        "beta1": _optional(functools.partial(check_range, "beta1", low=0.0, high=1.0, high_open=True)),
        "beta2_cap": _optional(functools.partial(check_range, "beta2_cap", low=0.0, high=1.0, high_open=True)),
        "decay_mode": functools.partial(check_choice, "decay_mode", choices=ref.DECAY_MODES),
        "eps_mode": functools.partial(check_choice, "eps_mode", choices=ref.EPS_MODES),
        "lr_mode": functools.partial(check_choice, "lr_mode", choices=ref.LR_MODES),
    }
    reduced_state_axes = ref.REDUCED_AXES

    def __init__(self, params: Iterable[Any], lr: Optional[float | torch.Tensor] = None,
                 eps: tuple[Optional[float], float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: Optional[float] = None, weight_decay: float = 0.0,
                 scale_parameter: bool = True, relative_step: bool = True, warmup_init: bool = False,
                 *, min_dim_size_to_factor: Optional[int] = None, beta2_cap: Optional[float] = None,
                 lr_mode: str = "scale", eps_mode: str = "paper", decay_mode: str = "hf",
                 child_tuning_mode: Optional[str] = None, reserve_p: float = 1.0, seed: int = 0,
                 maximize: bool = False, skip_nonfinite: bool = True, backend: str = "auto",
                 bf16_rounding: str = "nearest", rounding_seed: int = 0, foreach: Optional[bool] = None) -> None:
        check_torch_flags(foreach=foreach)
        lr_mode = check_choice("lr_mode", lr_mode, ref.LR_MODES)
        if lr is None:
            if not relative_step:
                raise ValueError("Invalid lr: None (an lr is required when relative_step=False)")
            lr = 1.0
        elif relative_step and lr_mode == "scale":
            raise ValueError("Invalid lr: a manual lr cannot be combined with relative_step=True "
                             "(leave lr=None, or pass relative_step=False, or lr_mode='rho_max')")
        if decay_mode == "torch" and relative_step and lr_mode == "scale":
            raise ValueError("Invalid decay_mode: 'torch' decays by lr·λ, but with relative_step=True and "
                             "lr_mode='scale' the lr is a multiplier of the relative step; use "
                             "decay_mode='hf' or lr_mode='rho_max'")
        if warmup_init and not relative_step:
            raise ValueError("Invalid warmup_init: warmup_init=True requires relative_step=True")
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"Invalid eps: {eps!r} (must be a pair (eps1, eps2))")
        eps_mode = check_choice("eps_mode", eps_mode, ref.EPS_MODES)
        if eps[0] is None and eps_mode != "torch":
            raise ValueError("Invalid eps[0]: None is only allowed with eps_mode='torch'")
        eps1 = None if eps[0] is None else check_nonnegative("eps[0]", eps[0])
        if min_dim_size_to_factor is not None and (not isinstance(min_dim_size_to_factor, int)
                                                   or min_dim_size_to_factor < 1):
            raise ValueError(f"Invalid min_dim_size_to_factor: {min_dim_size_to_factor!r} "
                             "(must be None or a positive int)")
        defaults = dict(
            lr=lr, eps=(eps1, check_nonnegative("eps[1]", eps[1])),
            # these are checked as a param group's values are (FxOptimizer.__init__, group_checks)
            clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
            scale_parameter=bool(scale_parameter), relative_step=bool(relative_step),
            warmup_init=bool(warmup_init), min_dim_size_to_factor=min_dim_size_to_factor,
            beta2_cap=beta2_cap, lr_mode=lr_mode, eps_mode=eps_mode, decay_mode=decay_mode,
            child_tuning_mode=child_tuning_mode, reserve_p=reserve_p, seed=seed,
            maximize=bool(maximize), skip_nonfinite=bool(skip_nonfinite), backend=backend,
            bf16_rounding=bf16_rounding, rounding_seed=rounding_seed,
        )
        super().__init__(params, defaults)
        _distributed.warn_flat_parameters([p for g in self.param_groups for p in g["params"]], "AdaFactor")

    def _get_lr(self, param_group: dict[str, Any], param_state: dict[str, Any]) -> float:
        r"""The step size :math:`\alpha_t = \rho_t\,\max(\epsilon_2, \mathrm{RMS}(\theta))` of the
        group's last step, for logging: the method ``transformers``' Adafactor has under this name,
        which its ``AdafactorSchedule`` calls with a group and its first parameter's state.

        That scheduler writes the value it logs into every group's ``lr``. The first call marks every
        relative-step group (:data:`LOGGED_LR_KEY`, saved with the group), and from then on their
        ``lr`` is not applied, as ``transformers``' Adafactor ignores it; a warning tells when the
        value the scheduler wrote at construction had scaled the steps taken before. With an
        external lr the written value is applied, as in ``transformers``; with ``lr_mode="rho_max"``
        (the lr caps the relative step) the call raises ``ValueError``.
        The parameter scale is the RMS of the group's first parameter now (``transformers`` keeps
        the one before its last update).
        """
        hp = ref.AdaFactorHyper.from_group(param_group)
        if hp.relative_step and hp.lr_mode == "rho_max":
            raise ValueError("AdaFactor: transformers' AdafactorSchedule writes the step size it logs into "
                             "the group's lr, which lr_mode='rho_max' reads as the cap of the relative step; "
                             "use a torch.optim.lr_scheduler (or none) with lr_mode='rho_max'")
        logged = hp.relative_step
        if logged and not param_group.get(LOGGED_LR_KEY, False):
            self._mark_logged_groups(param_group, param_state)
        step = max(int(param_state.get("step", 0)), 1)
        size = ref.step_size(1.0 if logged else float(param_group["lr"]), ref.host_scalars(step, hp), hp)
        if hp.scale_parameter:
            param = param_group["params"][0].detach()
            if _distributed.is_dtensor(param):
                param = param.full_tensor()
            size *= float(ref.param_scale(param.to(compute_dtype(param.dtype)), hp))
        return float(size)

    def _mark_logged_groups(self, read: dict[str, Any], read_state: dict[str, Any]) -> None:
        """The first read marks every relative-step group (:data:`LOGGED_LR_KEY`), since the scheduler
        writes into all of them; a warning tells when the lr it wrote at construction scaled steps
        already taken."""
        if float(read["lr"]) != 1.0 and read_state.get("step", 0) > 0:
            warnings.warn(f"AdaFactor: a scheduler reads the step size through _get_lr (transformers' "
                          f"AdafactorSchedule): the lr it writes is not applied from now on; the steps before "
                          f"used the lr it wrote at construction, {float(read['lr'])!r}, as the multiplier of "
                          f"the relative step (AdafactorSchedule(opt, initial_lr=1.0) avoids that)",
                          UserWarning, stacklevel=4)
        for group in self.param_groups:
            if group["relative_step"] and group["lr_mode"] == "scale":
                group[LOGGED_LR_KEY] = True

    def _step_lr(self, group: dict[str, Any]) -> Any:
        if group.get(LOGGED_LR_KEY, False) and group["relative_step"] and group["lr_mode"] == "scale":
            return 1.0  # the group's lr holds the step size a logging scheduler wrote (_get_lr)
        return group["lr"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102
        relative = param_group.get("relative_step", self.defaults["relative_step"])
        if "lr" in param_group and param_group["lr"] is None:
            # transformers' spelling of "the relative step alone", as the constructor's lr=None
            if not relative:
                raise ValueError("Invalid lr: None (an lr is required when relative_step=False)")
            param_group["lr"] = 1.0
        elif ("lr" in param_group and relative and param_group.get("lr_mode", self.defaults["lr_mode"]) == "scale"
              and param_group["lr"] != 1.0 and not param_group.get(LOGGED_LR_KEY, False)):
            # as the constructor: transformers ignores such an lr, here it would scale the relative step
            # (1.0, the multiplier's neutral value, and a logged step size are what this class stores)
            raise ValueError(f"Invalid lr: {param_group['lr']!r} in a param group with relative_step=True "
                             "(transformers' Adafactor ignores it; here it would multiply the relative "
                             "step): leave it out, or set relative_step=False or lr_mode='rho_max' in the group")
        super().add_param_group(param_group)
        self._record_given(self.param_groups[-1]["params"])

    def _record_given(self, params: Iterable[Tensor]) -> WeakIdKeyDictionary:
        """Remember the tensors handed to the constructor and ``add_param_group`` (weakly) and whether
        any had two or more dimensions, the ones AdaFactor factors (kept as a flag: DeepSpeed's stage 3
        empties the model's parameters). Unpickling and ``deepcopy`` keep only torch.optim's own
        fields: ``__setstate__`` records the copy's groups as they arrive."""
        given = self.__dict__.get("_given")
        if given is None:  # first use, or a copy arriving: everything the groups hold now
            given = self.__dict__["_given"] = WeakIdKeyDictionary()
            self._given_matrix = False
            params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            given[p] = True
            self._given_matrix = self._given_matrix or p.dim() >= 2
        return given

    # Dynamo cannot trace the weak dictionary: the frame it would compile instead guards on each
    # parameter, one recompile per tensor (past the recompile limit on a real model's first step)
    @torch.compiler.disable
    def _init_state(self, state: dict[str, Tensor], p: Tensor, hyper: Any) -> None:
        super()._init_state(state, p, hyper)
        if p.dim() == 1 and p not in self._record_given(()):
            self._fresh_unknown_1d = True  # judged in _init_group, which sees the whole group

    def _init_group(self, group, params, grads, states, hyper):  # noqa: D102
        super()._init_group(group, params, grads, states, hyper)
        if self.__dict__.pop("_fresh_unknown_1d", False) and not self.__dict__.get("_warned_replaced", False):
            # a flat partition replaced the group's matrices (DeepSpeed ZeRO), not per-parameter
            # copies that keep their shapes (DeepSpeed's bf16 master weights at stage 0): the group
            # holds no tensor of two or more dimensions although the optimizer was given some
            if self._given_matrix and not any(t.dim() >= 2 for t in group["params"]):
                self._warned_replaced = True
                _distributed.warn_replaced_parameter(max(group["params"], key=Tensor.numel), "AdaFactor")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; also a ``torch.optim.Adafactor`` checkpoint, whose groups then take
        the options that reproduce its step (:mod:`~optimfx.optim.adafactor_checkpoints`)."""
        super().load_state_dict(adafactor_checkpoints.from_torch(state_dict))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a group without lr_mode comes from a transformers Adafactor checkpoint, whose relative step
        # ignores the group's lr: it holds None, or the step size its AdafactorSchedule logged
        foreign = [id(g) for g in state.get("param_groups", ()) if "lr_mode" not in g]
        super().__setstate__(state)
        self._record_given(())  # the tensors the copy holds now, before anything rewrites its groups
        for group in self.param_groups:
            # here a relative-step group's lr is the multiplier that schedulers scale, 1.0 by default
            relative = group.get("relative_step", True)
            if relative and (group.get("lr") is None or id(group) in foreign):
                group["lr"] = 1.0
