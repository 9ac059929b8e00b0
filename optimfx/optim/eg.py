"""``EGStepSize``: exponentiated-gradient step-size adaptation around any optimizer (maths in ``reference/eg.py``)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim import Optimizer

from .._dispatch import all_finite
from .._precision import compute_dtype
from .._validation import check_choice, check_nonnegative, check_range
from ..reference import eg as ref

Tensor = torch.Tensor
_EG_KEYS = ("eg_lr", "eg_momentum", "eg_beta", "gamma_scale", "gamma_gain", "normalize", "scope",
            "exp_clip", "gain_min", "gain_max")


class EGStepSize(Optimizer):
    r"""Adapt a global step-size scale and per-coordinate gains of any optimizer multiplicatively.

    The base optimizer proposes a step ``d_t`` (its own update, learning rate included); EG turns it
    into

    .. math::

        s_t = s_{t-1} e^{\gamma_s a_t},\quad p_t = p_{t-1}\odot e^{\gamma_p z_t},\quad
        \nu_t = \mu\nu_{t-1} + \eta\, p_t\odot d_t,\quad \theta_t = \theta_{t-1} - s_t\nu_t

    where ``a_t`` measures the alignment of the current gradient with the previous velocity and ``z_t``
    that of the gradient with its running average (normalised to cosines by default). Scale and gains
    stay positive by construction; all alignments are computed before any parameter moves.

    This generic adapter runs the base's ``step()`` and reads ``d_t`` off the parameters (one parameter
    copy per step); it works with every ``torch.optim`` optimizer.

    Args:
        base: the optimizer whose steps are adapted (its param groups, learning rates and schedulers
            are shared).
        lr: η, multiplies the base step. Default: ``1.0``.
        momentum: μ of the velocity (0 when the base has its own momentum). Default: ``0.0``.
        beta: EMA coefficient of the average gradient used by the gains. Default: ``0.9``.
        gamma_scale: γ_s. Default: ``1e-2``.
        gamma_gain: γ_p. Default: ``1e-2`` (``0`` disables the gains).
        normalize: cosine-normalised exponents [unv in the paper]; ``False`` uses raw dot products
            (then γ has units of 1/gradient² and must be tuned). Default: ``True``.
        scope: one scale per ``"tensor"``, per ``"group"`` or ``"global"``. Default: ``"tensor"``.
        exp_clip: clamp on every exponent. Default: ``1.0``.
        gain_clamp: ``(min, max)`` of the gains. Default: ``(1e-3, 1e3)``.
        skip_nonfinite: skip the whole step (base included) when gradients hold inf/NaN. Default: ``True``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.EGStepSize(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Amid, Anil, Fifty & Warmuth, `Step-size Adaptation Using Exponentiated Gradient Updates
        <https://arxiv.org/abs/2202.00145>`_, 2022.
    """

    def __init__(self, base: Optimizer, lr: float = 1.0, momentum: float = 0.0, beta: float = 0.9,
                 gamma_scale: float = 1e-2, gamma_gain: float = 1e-2, *, normalize: bool = True,
                 scope: str = "tensor", exp_clip: Optional[float] = 1.0,
                 gain_clamp: tuple[Optional[float], Optional[float]] = (1e-3, 1e3),
                 skip_nonfinite: bool = True) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"EGStepSize wraps a torch.optim.Optimizer, got {type(base).__name__}")
        defaults = dict(
            eg_lr=check_nonnegative("lr", lr), eg_momentum=check_range("momentum", momentum, 0.0, 1.0, high_open=True),
            eg_beta=check_range("beta", beta, 0.0, 1.0, high_open=True),
            gamma_scale=check_nonnegative("gamma_scale", gamma_scale),
            gamma_gain=check_nonnegative("gamma_gain", gamma_gain), normalize=bool(normalize),
            scope=check_choice("scope", scope, ref.SCOPES),
            exp_clip=None if exp_clip is None else check_nonnegative("exp_clip", exp_clip),
            gain_min=None if gain_clamp[0] is None else check_nonnegative("gain_clamp[0]", gain_clamp[0]),
            gain_max=None if gain_clamp[1] is None else check_nonnegative("gain_clamp[1]", gain_clamp[1]),
        )
        self.base = base
        self.skip_nonfinite = bool(skip_nonfinite)
        # share the base's group dicts, so schedulers and add_param_group act on both
        super().__init__(base.param_groups, defaults)
        self.param_groups = base.param_groups
        self._warned_skip = False

    @staticmethod
    def _hyper(group: dict) -> ref.EGHyper:
        return ref.EGHyper(group["eg_lr"], group["eg_momentum"], group["eg_beta"], group["gamma_scale"],
                           group["gamma_gain"], group["normalize"], group["exp_clip"], group["gain_min"],
                           group["gain_max"])

    def _state_for(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            kw = dict(dtype=compute_dtype(p.dtype), device=p.device)
            state["scale"] = torch.ones((), **kw)
            state["gains"] = torch.ones(p.shape, **kw)
            state["velocity"] = torch.zeros(p.shape, **kw)
            state["avg_grad"] = torch.zeros(p.shape, **kw)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the base step, then rescale it by the adapted scale and gains."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not live:
            return loss
        if self.skip_nonfinite and not all_finite([p.grad for p in live]):
            if not self._warned_skip:
                self._warned_skip = True
                warnings.warn("EGStepSize: gradients hold inf/NaN; the step was skipped (shown once).",
                              RuntimeWarning, stacklevel=2)
            return loss
        grads = {p: p.grad.to(compute_dtype(p.dtype), copy=True) for p in live}
        exponents = self._exponents(grads)
        before = {p: p.detach().clone() for p in live}
        self.base.step()
        for group in self.param_groups:
            hp = self._hyper(group)
            for p in group["params"]:
                if p not in grads:
                    continue
                proposed = p.detach().to(grads[p].dtype, copy=True)
                direction = before[p].to(grads[p].dtype) - proposed
                ref.step_(proposed, grads[p], direction, self._state_for(p), exponents[p], hp)
                p.copy_(proposed)
        return loss

    def _exponents(self, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """Every tensor's scale exponent, from its scope unit, before anything moves."""
        parts: dict[Tensor, tuple[Tensor, Tensor, Tensor]] = {}
        for p, g in grads.items():
            parts[p] = ref.scale_exponent_parts(self._state_for(p)["velocity"], g)
        out: dict[Tensor, Tensor] = {}
        global_sum = None
        if any(g["scope"] == "global" for g in self.param_groups):
            global_sum = [sum(v[k].double() for v in parts.values()) for k in range(3)]
        for group in self.param_groups:
            hp = self._hyper(group)
            members = [p for p in group["params"] if p in parts]
            if not members:
                continue
            if group["scope"] == "tensor":
                for p in members:
                    out[p] = ref.scale_exponent(*parts[p], hp)
                continue
            summed = global_sum if group["scope"] == "global" else [
                sum(parts[p][k].double() for p in members) for k in range(3)]
            shared = ref.scale_exponent(*summed, hp)
            for p in members:
                out[p] = shared.to(parts[p][0].dtype)
        return out

    def scale_stats(self) -> list[dict[str, float]]:
        """Per group: mean/min/max of the scales and the mean gain, for logging (host reads)."""
        stats = []
        for group in self.param_groups:
            states = [self.state[p] for p in group["params"] if p in self.state and self.state[p]]
            if not states:
                stats.append({})
                continue
            scales = torch.stack([s["scale"].double().cpu() for s in states])
            gains = torch.cat([s["gains"].double().flatten().cpu() for s in states])
            stats.append({"scale_mean": float(scales.mean()), "scale_min": float(scales.min()),
                          "scale_max": float(scales.max()), "gain_mean": float(gains.mean())})
        return stats

    def state_dict(self) -> dict[str, Any]:
        """EG state in the standard layout, with the base's full state under ``"base"``."""
        out = super().state_dict()
        out["base"] = self.base.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base = state_dict.pop("base")
        self.base.load_state_dict(base)
        super().load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        for p, state in self.state.items():  # keep EG statistics in the policy dtype
            for key, value in state.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    state[key] = value.to(compute_dtype(p.dtype))


def Funnel(params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, beta: float = 0.9,
           gamma_scale: float = 1e-2, gamma_gain: float = 1e-2, **kwargs: Any) -> EGStepSize:
    r"""Funnel: EG step-size adaptation of SGD with momentum, the paper's setting.

    .. math::

        \nu_t = \mu\,\nu_{t-1} + \eta\, p_t \odot g_t, \qquad \theta_t = \theta_{t-1} - s_t\,\nu_t

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: η, the SGD learning rate (schedulers scale it). Default: ``0.1``.
        momentum: μ. Default: ``0.9``.
        beta: EMA coefficient of the average gradient used by the gains. Default: ``0.9``.
        gamma_scale: γ_s. Default: ``1e-2``.
        gamma_gain: γ_p. Default: ``1e-2``.
        **kwargs: any other :class:`EGStepSize` keyword (``normalize``, ``scope``, ``exp_clip``, ...).

    Returns:
        An :class:`EGStepSize` around ``torch.optim.SGD(params, lr=lr)``.
    """
    return EGStepSize(torch.optim.SGD(params, lr=lr), lr=1.0, momentum=momentum, beta=beta,
                      gamma_scale=gamma_scale, gamma_gain=gamma_gain, **kwargs)
