"""``EGStepSize``: exponentiated-gradient step-size adaptation around any optimizer (maths in ``reference/eg.py``).

One step, for every param group (all alignments are measured before any parameter moves):

1. ``before``: the sums ``⟨ν, g⟩, ‖ν‖², ‖g‖², ‖m‖²`` per tensor, the scale exponents of each scope
   unit, the new scales; the reference backend also updates the gains and the average gradient here
   (they read only ``g`` and ``m``) and copies ``θ`` into one saved-parameter buffer;
2. the base optimizer's ``step()`` writes its proposal ``θ − d`` into the parameters;
3. ``after``: ``d = θ_saved − θ_proposed`` in place in the saved buffer, then velocity and parameter
   (the Triton backend runs the gains, velocity, parameter and average-gradient update in one pass).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch
from torch.optim import Optimizer

from .._dispatch import all_finite, resolve_backend
from .._precision import compute_dtype, real_view, working_copy
from .._validation import check_choice, check_nonnegative, check_range
from ..reference import eg as ref

Tensor = torch.Tensor
BACKENDS = ("auto", "reference", "triton")


class _Unit(NamedTuple):
    """The tensors of one param group that take a step (real views), with their state and settings."""

    hp: ref.EGHyper
    scope: str
    backend: str
    owners: list[Tensor]  # the parameters themselves (keys of ``state`` and of the scratch buffers)
    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Tensor]]


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
                 skip_nonfinite: bool = True, backend: str = "auto") -> None:
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
            # "eg_" keeps it apart from the ``backend`` key of an optimfx base (the groups are shared)
            eg_backend=check_choice("backend", backend, BACKENDS),
        )
        self.base = base
        self.skip_nonfinite = bool(skip_nonfinite)
        # share the base's group dicts, so schedulers and add_param_group act on both
        super().__init__(base.param_groups, defaults)
        self.param_groups = base.param_groups
        self._warned_skip = False
        self._scratch: dict[Any, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and groups; the base and the flag belong to a copy too
        return {**super().__getstate__(), "base": self.base, "skip_nonfinite": self.skip_nonfinite,
                "_warned_skip": self._warned_skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints written before an option existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._scratch = {}

    @staticmethod
    def _hyper(group: dict) -> ref.EGHyper:
        return ref.EGHyper(group["eg_lr"], group["eg_momentum"], group["eg_beta"], group["gamma_scale"],
                           group["gamma_gain"], group["normalize"], group["exp_clip"], group["gain_min"],
                           group["gain_max"])

    def _state_for(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            view = real_view(p)
            kw = dict(dtype=compute_dtype(p.dtype), device=p.device)
            state["scale"] = torch.ones((), **kw)
            state["gains"] = torch.ones(view.shape, **kw)
            state["velocity"] = torch.zeros(view.shape, **kw)
            state["avg_grad"] = torch.zeros(view.shape, **kw)
        return state

    def _units(self) -> list[_Unit]:
        units = []
        for group in self.param_groups:
            owners = [p for p in group["params"] if p.grad is not None]
            if not owners:
                continue
            params = [real_view(p) for p in owners]
            grads = [real_view(p.grad) for p in owners]
            if group.get("maximize", False):
                # a maximising base descends along −g: the alignments must see the same sign
                grads = [torch.neg(g) for g in grads]
            units.append(_Unit(self._hyper(group), group["scope"], resolve_backend(group["eg_backend"], params),
                               owners, params, grads, [self._state_for(p) for p in owners]))
        if any(u.scope == "global" for u in units) and len({u.backend for u in units}) > 1:
            raise RuntimeError("EGStepSize: scope='global' needs one backend for every param group, got "
                               f"{sorted({u.backend for u in units})}")
        return units

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the base step, then rescale it by the adapted scale and gains."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = self._units()
        if not units:
            return loss
        fast = [u for u in units if u.backend == "triton"]
        slow = [u for u in units if u.backend != "triton"]
        saved = self._reference_before(slow) if slow else []
        if saved is None:
            if not self._warned_skip:
                self._warned_skip = True
                warnings.warn("EGStepSize: gradients hold inf/NaN; the step was skipped (shown once).",
                              RuntimeWarning, stacklevel=2)
            return loss
        handle = self._kernels().before(fast, self.skip_nonfinite, self._scratch) if fast else None
        self.base.step()
        for unit, buffers in zip(slow, saved):
            # d = θ_saved − θ_proposed, in place in the saved buffer
            torch._foreach_sub_(buffers, unit.params)
            for p, d, state in zip(unit.params, buffers, unit.states):
                ref.apply_(p, d, state, unit.hp)
        if handle is not None:
            self._kernels().after(handle)
        return loss

    @staticmethod
    def _kernels() -> Any:
        return importlib.import_module("optimfx._kernels.eg")

    def _reference_before(self, units: list[_Unit]) -> Optional[list[list[Tensor]]]:
        """Steps 1, 2 and 5 of every unit and the saved parameters; ``None`` when the step is skipped."""
        grads = [[working_copy(g) for g in u.grads] for u in units]
        parts = [ref.alignment_parts([s["velocity"] for s in u.states], gs, [s["avg_grad"] for s in u.states])
                 for u, gs in zip(units, grads)]
        if self.skip_nonfinite and not self._finite(units, parts):
            return None
        saved = []
        for unit, gs, part, exponent in zip(units, grads, parts, self._exponents(units, parts)):
            torch._foreach_mul_([s["scale"] for s in unit.states], list(exponent.exp().unbind()))
            numels = torch.tensor([g.numel() for g in gs], dtype=part.dtype, device=part.device)
            coefs = ref.gain_coefficient(part[:, 3], part[:, 2], numels, unit.hp)
            buffers = self._saved_buffers(unit)
            for g, state, c, buf in zip(gs, unit.states, coefs.tolist(), buffers):
                # the saved-parameter buffer is the exponent's scratch until θ is copied into it
                ref.update_gains_(state["gains"], state["avg_grad"], g, unit.hp, c, scratch=buf)
            ref.update_average_([s["avg_grad"] for s in unit.states], gs, unit.hp)
            torch._foreach_copy_(buffers, unit.params)
            saved.append(buffers)
        return saved

    @staticmethod
    def _finite(units: list[_Unit], parts: list[Tensor]) -> bool:
        # finite ‖g‖² proves every gradient finite; otherwise the exact check decides (overflow)
        if all(bool(part[:, 2].isfinite().all()) for part in parts):
            return True
        return all_finite([g for u in units for g in u.grads])

    def _saved_buffers(self, unit: _Unit) -> list[Tensor]:
        """One persistent buffer per parameter, in the state dtype, reused every step (no allocation)."""
        out = []
        for owner, p in zip(unit.owners, unit.params):
            buf = self._scratch.get(owner)
            dtype = compute_dtype(p.dtype)
            if buf is None or buf.shape != p.shape or buf.dtype != dtype or buf.device != p.device:
                buf = torch.empty(p.shape, dtype=dtype, device=p.device)
                self._scratch[owner] = buf
            out.append(buf)
        return out

    @staticmethod
    def _exponents(units: list[_Unit], parts: list[Tensor]) -> list[Tensor]:
        """Every tensor's scale exponent, from its scope unit (sums of shared scopes in float64)."""
        total = None
        if any(u.scope == "global" for u in units):
            device = parts[0].device
            total = torch.cat([p.to(device, torch.float64) for p in parts]).sum(0)
        out = []
        for unit, part in zip(units, parts):
            if unit.scope == "tensor":
                out.append(ref.scale_exponent(part[:, 0], part[:, 1], part[:, 2], unit.hp))
                continue
            summed = total.to(part.device) if unit.scope == "global" else part.double().sum(0)
            shared = ref.scale_exponent(summed[0], summed[1], summed[2], unit.hp)
            out.append(shared.to(part.dtype).expand(len(part)))
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
        for group in self.param_groups:  # checkpoints written before an option existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for p, state in self.state.items():  # keep EG statistics in the policy dtype, never shared
            for key, value in state.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    restored = value.to(compute_dtype(p.dtype))
                    state[key] = restored.clone() if restored.data_ptr() == value.data_ptr() else restored


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
