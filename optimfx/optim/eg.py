"""``EGStepSize``: exponentiated-gradient step-size adaptation around any optimizer (maths in ``reference/eg.py``).

One step, for every param group (all alignments are measured before any parameter moves):

1. ``before``: the sums ``⟨ν, g⟩, ‖ν‖², ‖g‖², ‖m‖²`` per tensor, the scale exponents of each scope
   unit, the new scales; the reference backend also updates the gains and the average gradient here
   (they read only ``g`` and ``m``) and copies ``θ`` into one saved-parameter buffer;
2. the base optimizer's ``step()`` writes its proposal ``θ − d`` into the parameters;
3. ``after``: ``d = θ_saved − θ_proposed`` in place in the saved buffer, then velocity and parameter
   (the Triton backend runs the gains, velocity, parameter and average-gradient update in one pass).

With a plain SGD base (``momentum="base"``, :func:`Funnel`) the step ``d`` is known, the base does not
step and nothing is saved. On fp32 CPU tensors the reference backend runs these steps in the C
kernels of ``optimfx._kernels.cpu_eg`` (sums; gains, average and saved ``θ``; velocity and
parameter), or, with a plain SGD base, the whole step in its second pass. Around optimfx's
``AdamW``/``AdaX`` (unmasked, on the reference backend) step 1's gains and average and steps 2
and 3 run in one pass: the base's ``step()`` hands its Adam kernel call to that pass, which forms
the proposal in registers (``eg_adam_pass.py``).

On FSDP2 (DTensor) parameters both backends step the local shards: the per-tensor sums are this
rank's partial sums, completed across ranks (``_distributed.sum_rows_``) before any exponent is
formed, and the state is created like the parameter (DTensors for the parameter-shaped buffers).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from functools import partial
from itertools import chain
from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch
from torch.optim import Optimizer

from .. import _distributed
from .._dispatch import on_device, resolve_backend
from .._kernels import cpu_eg
from .._precision import compute_dtype, real_view, restored_state
from .._validation import apply_checks, check_choice, check_lr, check_nonnegative, check_positive, check_range
from ..reference import aten_fused
from ..reference import eg as ref
from ._wrapped_state import (add_param_group_via_base, fill_own_defaults, load_with_base_state,
                             refuse_closure_steps, restore_own_defaults, share_base_groups, state_dict_with_base,
                             unchanged_if_refused)
from .base import FxOptimizer
from .eg_adam_pass import AdamPass, base_takes_part

Tensor = torch.Tensor
BACKENDS = ("auto", "reference", "triton")
#: ``momentum`` value that takes μ from a plain SGD base's ``momentum`` key (Funnel)
BASE_MOMENTUM = "base"
#: how a unit is stepped (:meth:`EGStepSize._reference_before`)
_REFERENCE, _KERNELS, _IN_BASE_STEP = "reference", "kernels", "in base step"


class _Unit(NamedTuple):
    """The tensors of one param group that take a step (real views), with their state and settings."""

    hp: ref.EGHyper
    scope: str
    backend: str
    owners: list[Tensor]  # the parameters themselves (keys of ``state`` and of the scratch buffers)
    params: list[Tensor]  # local tensors: real views, FSDP2 shards
    grads: list[Tensor]
    states: list[dict[str, Any]]  # local views; a sharded tensor's ShardSpec under _distributed.SHARD_KEY
    group: dict[str, Any]  # the param group (shared with the base)


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
    copy per step); it works with every ``torch.optim`` optimizer whose ``step()`` runs without a
    closure (``LBFGS``, which evaluates the loss again within a step, is refused).

    Args:
        base: the optimizer whose steps are adapted (its param groups, learning rates and schedulers
            are shared).
        lr: η, multiplies the base step. Default: ``1.0``.
        momentum: μ of the velocity (0 when the base has its own momentum), or ``"base"``: μ is a plain
            ``torch.optim.SGD`` base's ``momentum`` group key, which EG applies in its velocity while
            the base only supplies ``lr·(g + λθ)`` (so schedulers that cycle ``momentum``, such as
            ``OneCycleLR``, drive μ; :func:`Funnel` builds this). Default: ``0.0``.
        beta: EMA coefficient of the average gradient used by the gains. Default: ``0.9``.
        gamma_scale: γ_s. Default: ``None``: ``1e-2`` with ``normalize=True``; required with
            ``normalize=False``.
        gamma_gain: γ_p (``0`` disables the gains). Default: ``None``: ``1e-2`` with ``normalize=True``;
            required with ``normalize=False``.
        normalize: cosine-normalised exponents (not verified against the paper); ``False`` uses raw dot products
            (then γ has units of 1/gradient² and must be tuned for the model, so both γ must be
            given). Default: ``True``.
        scope: one scale per ``"tensor"``, per ``"group"`` or ``"global"``. Default: ``"tensor"``.
        exp_clip: clamp on every exponent. Default: ``1.0``.
        gain_clamp: ``(min, max)`` of the gains, either ``None`` for no bound. Default: ``(1e-3, 1e3)``.
        skip_nonfinite: skip the whole step (base included) when gradients hold inf/NaN. Default: ``True``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``. Default: ``"auto"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.EGStepSize(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Amid, Anil, Fifty & Warmuth, `Step-size Adaptation Using Exponentiated Gradient Updates
        <https://arxiv.org/abs/2202.00145>`_, 2022.

    Note:
        Under FSDP2 (``fully_shard``) the base must step DTensor parameters too (every optimfx
        optimizer and ``torch.optim`` does); EG's sums are completed across ranks, so a sharded run
        matches a single-process one, and its state is DTensors that ``torch.distributed.checkpoint``
        saves and reshards, with the base's state in the same per-parameter entries.
    """

    #: checks of the EG options a param group may set for itself (the group keys of the defaults)
    group_checks = {
        "eg_lr": partial(check_nonnegative, "lr"),
        "eg_momentum": lambda v: v if v == BASE_MOMENTUM else _check_momentum(v),
        "eg_beta": partial(check_range, "beta", low=0.0, high=1.0, high_open=True),
        "gamma_scale": partial(check_nonnegative, "gamma_scale"),
        "gamma_gain": partial(check_nonnegative, "gamma_gain"),
        "scope": partial(check_choice, "scope", choices=ref.SCOPES),
        "exp_clip": lambda v: None if v is None else check_nonnegative("exp_clip", v),
        "gain_min": lambda v: _check_gain_clamp((v, None))[0],
        "gain_max": lambda v: _check_gain_clamp((None, v))[1],
        "eg_backend": partial(check_choice, "backend", choices=BACKENDS),
    }

    def __init__(self, base: Optimizer, lr: float = 1.0, momentum: float | str = 0.0, beta: float = 0.9,
                 gamma_scale: Optional[float] = None, gamma_gain: Optional[float] = None, *, normalize: bool = True,
                 scope: str = "tensor", exp_clip: Optional[float] = 1.0,
                 gain_clamp: tuple[Optional[float], Optional[float]] = (1e-3, 1e3),
                 skip_nonfinite: bool = True, backend: str = "auto") -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"EGStepSize wraps a torch.optim.Optimizer, got {type(base).__name__}")
        refuse_closure_steps(base, "EGStepSize")
        gamma_scale, gamma_gain = _meta_step_sizes(gamma_scale, gamma_gain, normalize)
        gain_min, gain_max = _check_gain_clamp(gain_clamp)
        defaults = apply_checks(dict(
            eg_lr=lr, eg_momentum=momentum, eg_beta=beta, gamma_scale=gamma_scale, gamma_gain=gamma_gain,
            normalize=bool(normalize), scope=scope, exp_clip=exp_clip, gain_min=gain_min, gain_max=gain_max,
            # "eg_" keeps it apart from the ``backend`` key of an optimfx base (the groups are shared)
            eg_backend=backend,
        ), self.group_checks)  # the checks of a param group's own values
        self.base = base
        self.skip_nonfinite = bool(skip_nonfinite)
        super().__init__(base.param_groups, defaults)
        share_base_groups(self, defaults)
        for group in self.param_groups:
            self._place_momentum(group)
        self._warned_skip = False
        self._scratch: dict[Any, Any] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer (its defaults and checks) and to this wrapper,
        which shares it; keys the group leaves out take both optimizers' defaults."""
        # the gain bounds as a pair, as the constructor's gain_clamp (each alone: group_checks)
        _check_gain_clamp((param_group.get("gain_min", self.defaults["gain_min"]),
                           param_group.get("gain_max", self.defaults["gain_max"])))
        add_param_group_via_base(self, param_group, super().add_param_group)
        if self.__dict__.get("param_groups") is not self.base.param_groups:
            return  # the constructor registering the base's groups: it places their μ afterwards
        try:
            self._place_momentum(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # the base's list too: it is the same list
            raise

    def _place_momentum(self, group: dict[str, Any]) -> None:
        """Where a group's μ lives. ``"base"``: the plain SGD base's ``momentum`` key, applied by EG
        (refused on other bases, and with ``nesterov`` or ``dampening``, which EG's velocity does not
        have). A numeric μ in a group of an optimizer whose own default is ``"base"`` (Funnel: a group's
        ``eg_momentum``, or a checkpoint written before μ moved to ``momentum``) moves there too, so
        the SGD base never holds a momentum of its own beside EG's."""
        is_sgd = type(self.base) is torch.optim.SGD
        if is_sgd and self.own_defaults.get("eg_momentum") == BASE_MOMENTUM and group["eg_momentum"] != BASE_MOMENTUM:
            group["momentum"], group["eg_momentum"] = group["eg_momentum"], BASE_MOMENTUM
        if group["eg_momentum"] != BASE_MOMENTUM:
            return
        if not is_sgd:
            raise ValueError(f"Invalid momentum: {BASE_MOMENTUM!r} takes μ from a torch.optim.SGD base's momentum, "
                             f"got a {type(self.base).__name__} base")
        if group["nesterov"] or group["dampening"] != 0:
            raise ValueError(f"Invalid momentum: {BASE_MOMENTUM!r} applies the SGD base's momentum as EG's "
                             "heavy-ball velocity, without nesterov or dampening (got nesterov="
                             f"{group['nesterov']}, dampening={group['dampening']})")

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and groups; the base and the flag belong to a copy too
        return {**super().__getstate__(), "base": self.base, "own_defaults": self.own_defaults,
                "skip_nonfinite": self.skip_nonfinite,
                "_warned_skip": self._warned_skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        restore_own_defaults(self)
        fill_own_defaults(self)
        self._scratch = {}

    @staticmethod
    def _hyper(group: dict) -> ref.EGHyper:
        momentum = group["eg_momentum"]
        if momentum == BASE_MOMENTUM:
            # the SGD base's key, where schedulers cycling momentum write
            momentum = _check_momentum(group["momentum"])
        return ref.EGHyper(group["eg_lr"], momentum, group["eg_beta"], group["gamma_scale"],
                           group["gamma_gain"], group["normalize"], group["exp_clip"], group["gain_min"],
                           group["gain_max"])

    def _state_for(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state.update(ref.init_state(real_view(p)))
        return state

    def _units(self) -> list[_Unit]:
        fill_own_defaults(self)
        units = []
        for group in self.param_groups:
            owners = [p for p in group["params"] if p.grad is not None]
            if not owners:
                continue
            if any(p.grad.is_sparse for p in owners):
                raise RuntimeError("EGStepSize does not support sparse gradients")
            params = [real_view(p) for p in owners]
            grads = [real_view(p.grad) for p in owners]
            states = [self._state_for(p) for p in owners]
            # FSDP2: the local shards, and state views that carry each shard's ShardSpec
            local = _distributed.local_group(params, grads, states, {})
            if local is not None:
                params, grads, states = local
            if group.get("maximize", False):
                # a maximising base descends along −g: the alignments must see the same sign
                grads = [torch.neg(g) for g in grads]
            units.append(_Unit(self._hyper(group), group["scope"], resolve_backend(group["eg_backend"], params),
                               owners, params, grads, states, group))
        fast = [u for u in units if u.backend == "triton"]
        if len({u.params[0].device for u in fast}) > 1 and all(u.group["eg_backend"] == "auto" for u in fast):
            # the kernels take one device per step: groups spread over several (model parallelism)
            # run the reference under "auto"; an explicit "triton" is refused in _kernel_device
            units = [u._replace(backend="reference") if u.backend == "triton" else u for u in units]
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
        self._update()
        return loss

    @torch.compiler.disable
    def _update(self) -> None:
        """The whole update, base step included. Inside a ``torch.compile``d training step it runs as
        one eager region (as optimfx's own optimizers do): its host scalars and reads are exact and
        no step-dependent value reaches a graph, so nothing recompiles as the step advances."""
        units = self._units()
        if not units:
            return
        fast = [u for u in units if u.backend == "triton"]
        slow = [u for u in units if u.backend != "triton"]
        # a plain SGD base's step is known exactly: no base step, no θ read back (see ref.sgd_direction_)
        direct = self._base_is_plain_sgd()
        adam_pass = AdamPass()
        saved = self._reference_before(slow, direct, None if fast else adam_pass) if slow else []
        if saved is None:
            self._warn_skipped()
            return
        device = self._kernel_device(fast)
        handle = None
        if fast:
            with on_device(device):
                handle = self._kernels().before(fast, self.skip_nonfinite, self._scratch, direct)
        if direct:
            for unit, (directions, how) in zip(slow, saved):
                if how == _REFERENCE:  # the CPU kernel has taken the whole step already
                    for p, d, state in zip(unit.params, directions, unit.states):
                        ref.apply_direct_(p, d, state, unit.hp)
            if handle is not None:
                with on_device(device):
                    self._kernels().after(handle)
            return
        if handle is not None and handle.flag is not None and not self._base_skips_nonfinite():
            # a base that would step on inf/NaN gradients (torch.optim's) must not run: its state
            # would be poisoned. Only an optimfx base skipping by itself lets the flag stay on the device.
            if bool(handle.flag.ne(0).any()):
                self._warn_skipped()
                return
        with aten_fused.steps_taken_by(adam_pass) if adam_pass else contextlib.nullcontext():
            if self.skip_nonfinite and not fast and isinstance(self.base, FxOptimizer):
                # the reference path has just checked every gradient on the host: one check, not two
                with self.base.gradients_known_finite():
                    self.base.step()
            else:
                self.base.step()
        adam_pass.check_done()
        for unit, (buffers, how) in zip(slow, saved):
            if how == _KERNELS:
                cpu_eg.apply(unit.params, unit.states, buffers, unit.hp)
            elif how == _REFERENCE:
                # d = θ_saved − θ_proposed, in place in the saved buffer
                torch._foreach_sub_(buffers, unit.params)
                for p, d, state in zip(unit.params, buffers, unit.states):
                    ref.apply_(p, d, state, unit.hp)
        if handle is not None:
            with on_device(device):
                self._kernels().after(handle)

    @staticmethod
    def _kernel_device(units: list[_Unit]) -> torch.device:
        """The device of the Triton units, whose passes launch once for all of them."""
        devices = {u.params[0].device for u in units}
        if len(devices) > 1:
            raise RuntimeError("EGStepSize: the Triton backend steps the param groups of one device together, "
                               f"got {sorted(map(str, devices))}; set eg_backend='reference' in the groups on "
                               "the other devices")
        return devices.pop() if devices else torch.device("cpu")

    def _warn_skipped(self) -> None:
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn("EGStepSize: gradients hold inf/NaN; the step was skipped (shown once).",
                          RuntimeWarning, stacklevel=4)

    def _base_skips_nonfinite(self) -> bool:
        """Whether the base skips a step with inf/NaN gradients by itself (an optimfx optimizer with
        ``skip_nonfinite`` in every group), so the Triton path need not read its flag on the host."""
        return isinstance(self.base, FxOptimizer) and all(g.get("skip_nonfinite", False)
                                                          for g in self.base.param_groups)

    @staticmethod
    def _kernels() -> Any:
        return importlib.import_module("optimfx._kernels.eg")

    def _base_is_plain_sgd(self) -> bool:
        """A ``torch.optim.SGD`` base whose step is ``lr·(±g + λθ)``: without momentum, or with its
        momentum taken over by EG (``momentum="base"``, Funnel's base). The base is then not stepped."""
        if type(self.base) is not torch.optim.SGD:
            return False
        groups = self.base.param_groups
        takes_over = [g.get("eg_momentum") == BASE_MOMENTUM for g in groups]
        if any(t and (g["nesterov"] or g["dampening"] != 0) for t, g in zip(takes_over, groups)):
            raise RuntimeError("EGStepSize: momentum='base' applies the SGD base's momentum as EG's heavy-ball "
                               "velocity; a group with nesterov=True or dampening is a different update")
        if all(t or g["momentum"] == 0 for t, g in zip(takes_over, groups)):
            return True
        if any(takes_over):
            raise RuntimeError("EGStepSize: momentum='base' needs EG to form every group's SGD step, but a group "
                               "with a numeric EG momentum has its own SGD momentum (the base would have to step)")
        return False

    def _reference_before(self, units: list[_Unit], direct: bool = False,
                          adam_pass: Optional[AdamPass] = None) -> Optional[list[tuple[list[Tensor], str]]]:
        """Steps 1, 2 and 5 of every unit and the saved parameters (``direct``: the plain SGD step
        ``d_t`` itself, or with the CPU kernels the whole step); ``None`` when the step is skipped.
        Each unit's entry is ``(saved buffers, how it is stepped)``: ``_REFERENCE`` (ATen ops),
        ``_KERNELS`` (``cpu_eg``'s passes) or ``_IN_BASE_STEP`` (registered in ``adam_pass``: the
        base's step runs EG's whole pass, :mod:`~optimfx.optim.eg_adam_pass`)."""
        # each in its parameter's compute dtype (a gradient's dtype may differ from its parameter's)
        grads = [[g.to(compute_dtype(p.dtype)) for p, g in zip(u.params, u.grads)] for u in units]
        fused = [self._cpu_kernels_take(u, gs) for u, gs in zip(units, grads)]
        parts = []
        for unit, gs, fast in zip(units, grads, fused):
            if fast:
                part = cpu_eg.alignment_parts(gs, unit.states)
            else:
                part = ref.alignment_parts([s["velocity"] for s in unit.states], gs,
                                           [s["avg_grad"] for s in unit.states])
            # FSDP2: a sharded tensor's row is this rank's part of its sums
            parts.append(_distributed.sum_rows_(part, [s.get(_distributed.SHARD_KEY) for s in unit.states]))
        if self.skip_nonfinite and not self._finite(units, parts):
            return None
        saved: list[tuple[list[Tensor], str]] = []
        exponents = ref.scope_exponents([u.scope for u in units], [u.hp for u in units], parts)
        for unit, gs, part, exponent, fast in zip(units, grads, parts, exponents, fused):
            numels = torch.tensor([_distributed.global_numel(g, s) for g, s in zip(gs, unit.states)],
                                  dtype=part.dtype, device=part.device)
            lr, decay = (float(unit.group["lr"]), float(unit.group["weight_decay"])) if direct else (0.0, 0.0)
            if fast:
                ref.update_scales_(unit.states, exponent)
                coefficients = ref.host_gain_coefficients(part, numels, unit.hp)
                if (not direct and adam_pass is not None and base_takes_part(self.base, unit, self.skip_nonfinite)
                        and adam_pass.add(unit, gs, coefficients)):
                    for owner in unit.owners:
                        # no saved copy from now on (the first step, before the base's state existed, made one)
                        self._scratch.pop(owner, None)
                    saved.append(([], _IN_BASE_STEP))
                    continue
                # with a plain SGD base the kernel takes the whole step: nothing is saved
                buffers = [] if direct else self._saved_buffers(unit)
                cpu_eg.adapt(unit.params, gs, unit.states, buffers or None, coefficients, unit.hp, direct=direct,
                             sgd_lr=lr, sgd_decay=decay)
                saved.append((buffers, _KERNELS))
                continue
            buffers = self._saved_buffers(unit)
            # the saved-parameter buffers are the gains' scratch until θ (or d) is written into them
            ref.adapt_(unit.states, gs, part, exponent, numels, unit.hp, scratches=buffers)
            if direct:
                for buf, g, p in zip(buffers, gs, unit.params):
                    ref.sgd_direction_(buf, g, p, lr, decay)
            else:
                torch._foreach_copy_(buffers, unit.params)
            saved.append((buffers, _REFERENCE))
        return saved

    @staticmethod
    def _cpu_kernels_take(unit: _Unit, grads: list[Tensor]) -> bool:
        """Whether the C kernels of ``optimfx._kernels.cpu_eg`` step this unit: fp32 contiguous CPU
        tensors, and the kernels built (the first call builds them)."""
        return (all(map(cpu_eg.takes, unit.params, grads, unit.states)) and bool(unit.params)
                and cpu_eg.available())

    @staticmethod
    def _finite(units: list[_Unit], parts: list[Tensor]) -> bool:
        # finite ‖g‖² proves every gradient finite; otherwise the exact check decides (overflow). The
        # sums are complete on every rank, so every rank takes the same branch and the same decision.
        # (meta tensors, for shape tracing, hold no values to check)
        if all(part.device.type == "meta" or bool(part[:, 2].isfinite().all()) for part in parts):
            return True
        return _distributed.all_finite([g for u in units for g in u.grads], [s for u in units for s in u.states])

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

    def scale_stats(self) -> list[dict[str, float]]:
        """Per group: mean/min/max of the scales and the mean gain, for logging (host reads).

        Under FSDP2 the gains are gathered (``full_tensor``): call it on every rank.
        """
        stats = []
        for group in self.param_groups:
            states = [self.state[p] for p in group["params"] if p in self.state and self.state[p]]
            if not states:
                stats.append({})
                continue
            scales = torch.stack([s["scale"].double().cpu() for s in states])
            full = [s["gains"].full_tensor() if _distributed.is_dtensor(s["gains"]) else s["gains"] for s in states]
            gains = torch.cat([g.double().flatten().cpu() for g in full])
            stats.append({"scale_mean": float(scales.mean()), "scale_min": float(scales.min()),
                          "scale_max": float(scales.max()), "gain_mean": float(gains.mean())})
        return stats

    def state_dict(self) -> dict[str, Any]:
        """EG state in the standard layout; each parameter's entry also holds the base's state for that
        parameter, as ``"base/<key>"``.

        One entry per parameter (the param groups are the base's) is what ``torch.distributed.checkpoint``
        maps to parameter names, saves and reshards (:mod:`optimfx.optim._wrapped_state`).
        """
        return state_dict_with_base(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load EG's and the base's state (also a checkpoint that holds the base's under ``"base"``).

        The state dict is split after the optimizer's own pre-hooks: the ``"base/"`` entries go to
        the base's ``load_state_dict``. EG state is restored from the saved values in the precision
        policy's dtype (``torch.optim`` would cast it to the parameter dtype: bf16 for a bf16 model).
        """
        with unchanged_if_refused(self):
            saved = load_with_base_state(self, state_dict, ref.STATE_KEYS, "EGStepSize")
            fill_own_defaults(self)
            for group in self.param_groups:
                self._place_momentum(group)
        saved_ids = chain.from_iterable(g["params"] for g in saved["param_groups"])
        for saved_id, p in zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)):
            for key, value in saved["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = restored_state(value, p)


def _check_momentum(value: Any) -> float:
    return check_range("momentum", value, low=0.0, high=1.0, high_open=True)


def _check_gain_clamp(gain_clamp: Any) -> tuple[Optional[float], Optional[float]]:
    """``(min, max)``: a non-negative min, a positive max (a zero gain never recovers), min ≤ max."""
    if not isinstance(gain_clamp, (tuple, list)) or len(gain_clamp) != 2:
        raise ValueError(f"Invalid gain_clamp: {gain_clamp!r} (must be a pair (min, max), either may be None)")
    low = None if gain_clamp[0] is None else check_nonnegative("gain_clamp[0]", gain_clamp[0])
    high = None if gain_clamp[1] is None else check_positive("gain_clamp[1]", gain_clamp[1])
    if low is not None and high is not None and low > high:
        raise ValueError(f"Invalid gain_clamp: {tuple(gain_clamp)!r} (min must not exceed max)")
    return low, high


def _meta_step_sizes(gamma_scale: Optional[float], gamma_gain: Optional[float],
                     normalize: bool) -> tuple[float, float]:
    """γ_s and γ_p: ``1e-2`` each when left out with normalised exponents (cosines, unitless); the
    raw form's γ scale 1/gradient², so there they have no default."""
    if not normalize:
        missing = [name for name, value in (("gamma_scale", gamma_scale), ("gamma_gain", gamma_gain)) if value is None]
        if missing:
            raise ValueError(f"Invalid {missing[0]}: None (normalize=False uses raw dot products, whose scale "
                             "is 1/gradient²: give gamma_scale and gamma_gain tuned for the model)")
    return (1e-2 if gamma_scale is None else gamma_scale), (1e-2 if gamma_gain is None else gamma_gain)


def Funnel(params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, beta: float = 0.9,
           gamma_scale: Optional[float] = None, gamma_gain: Optional[float] = None, **kwargs: Any) -> EGStepSize:
    r"""Funnel: EG step-size adaptation of SGD with momentum, the paper's setting.

    .. math::

        \nu_t = \mu\,\nu_{t-1} + \eta\, p_t \odot g_t, \qquad \theta_t = \theta_{t-1} - s_t\,\nu_t

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: η, the SGD learning rate (schedulers scale it). Default: ``0.1``.
        momentum: μ, kept in the param groups' ``momentum`` key (as ``torch.optim.SGD``'s), so
            schedulers that cycle momentum (``OneCycleLR``, ``CyclicLR``) drive it. Default: ``0.9``.
        beta: EMA coefficient of the average gradient used by the gains. Default: ``0.9``.
        gamma_scale: γ_s. Default: ``1e-2`` (required with ``normalize=False``).
        gamma_gain: γ_p. Default: ``1e-2`` (required with ``normalize=False``).
        **kwargs: any other :class:`EGStepSize` keyword (``normalize``, ``scope``, ``exp_clip``, ...).

    Returns:
        An :class:`EGStepSize` around ``torch.optim.SGD(params, lr=lr, momentum=momentum)`` with
        ``momentum="base"``: EG forms SGD's step ``lr·(g + λθ)`` itself and applies μ in its velocity
        (the base is not stepped). With γ = 0 and a constant ``lr`` this is ``torch.optim.SGD`` with
        momentum μ; under a schedule the two differ, as ``lr`` is inside the velocity here and
        outside torch's momentum buffer.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.Funnel(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Amid, Anil, Fifty & Warmuth, `Step-size Adaptation Using Exponentiated Gradient Updates
        <https://arxiv.org/abs/2202.00145>`_, 2022.
    """
    # SGD's own checks word them otherwise and let nan through
    check_lr(lr)
    momentum = _check_momentum(momentum)
    return EGStepSize(torch.optim.SGD(params, lr=lr, momentum=momentum), lr=1.0, momentum=BASE_MOMENTUM,
                      beta=beta, gamma_scale=gamma_scale, gamma_gain=gamma_gain, **kwargs)
