r"""Exponentiated-gradient step-size adaptation ("Funnel"), reference.

Around a base update direction ``d_t`` (SGD: ``g_t``), with the raw gradient ``g_t``:

.. math::

    s_t &= s_{t-1}\exp(\gamma_s\, a_t), \qquad a_t = \langle \nu_{t-1}, g_t\rangle
        \ \text{(normalised: cosine)}\\
    p_t &= p_{t-1}\odot\exp(\gamma_p\, z_t), \qquad z_t = m_{t-1}\odot g_t
        \ \text{(normalised: divided by } \mathrm{RMS}(m_{t-1})\mathrm{RMS}(g_t))\\
    \nu_t &= \mu\,\nu_{t-1} + \eta\, p_t \odot d_t, \qquad \theta_t = \theta_{t-1} - s_t\,\nu_t,
        \qquad m_t = \beta m_{t-1} + (1-\beta) g_t

Exponents are clamped to ``±exp_clip`` and gains to ``gain_clamp``, so ``s, p > 0`` by construction.
A positive alignment (the last step was too short) grows the scale.

The equations come from a secondary transcription of the paper; the normalised variant and wrapping
bases other than SGD with momentum are optimfx generalisations (not verified against the paper).

References:
    Amid, Anil, Fifty & Warmuth, `Step-size Adaptation Using Exponentiated Gradient Updates
    <https://arxiv.org/abs/2202.00145>`_, 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._precision import compute_dtype
from . import common

Tensor = torch.Tensor
SCOPES = ("tensor", "group", "global")


@dataclass(frozen=True)
class EGHyper:
    lr: float  # η
    momentum: float  # μ
    beta: float  # gradient EMA for the gains
    gamma_scale: float  # γ_s
    gamma_gain: float  # γ_p
    normalize: bool
    exp_clip: Optional[float]
    gain_min: Optional[float]
    gain_max: Optional[float]


#: the per-parameter state of :func:`init_state`
STATE_KEYS = ("scale", "gains", "velocity", "avg_grad")


def init_state(param: Tensor) -> dict[str, Tensor]:
    """§3.3: ``scale`` s = 1 (0-d), ``gains`` p = 1, ``velocity`` ν = 0, ``avg_grad`` m = 0, in the policy dtype.

    The buffers are made ``*_like`` the parameter (contiguous): for an FSDP2 (DTensor) parameter they
    are DTensors with its placements, allocated per shard; ``scale`` is a plain tensor on every rank.
    """
    kw = dict(dtype=compute_dtype(param.dtype), memory_format=torch.contiguous_format)
    return {"scale": torch.ones((), dtype=kw["dtype"], device=param.device), "gains": torch.ones_like(param, **kw),
            "velocity": torch.zeros_like(param, **kw), "avg_grad": torch.zeros_like(param, **kw)}


def _clip(x: Tensor, hp: EGHyper) -> Tensor:
    return x if hp.exp_clip is None else x.clamp_(-hp.exp_clip, hp.exp_clip)


def scale_exponent_parts(nu_prev: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(⟨ν_{t-1}, g_t⟩, ‖ν_{t-1}‖², ‖g_t‖²)`` of one tensor; sums of these give group/global alignment."""
    return (torch.dot(nu_prev.flatten(), grad.flatten()), nu_prev.square().sum(), grad.square().sum())


def alignment_parts(velocities: list[Tensor], grads: list[Tensor], avg_grads: list[Tensor]) -> Tensor:
    """``[T, 4]`` rows ``(⟨ν_{t-1}, g_t⟩, ‖ν_{t-1}‖², ‖g_t‖², ‖m_{t-1}‖²)``, one per tensor of a group.

    Every exponent of step ``t`` is a function of these sums (§3.1 steps 1–2). The sums of squares
    are BLAS dot products for large tensors and one ``_foreach_norm`` for small ones
    (:func:`~optimfx.reference.common.sums_of_squares`; read-only passes, no temporaries); the dot
    products are one ``dot`` per tensor. A row of an empty tensor is all zeros. On an FSDP2 shard a
    row holds the shard's partial sums; :func:`optimfx._distributed.sum_rows_` completes them across
    ranks.
    """
    n = len(grads)
    squares = common.sums_of_squares(velocities + grads + avg_grads).reshape(3, n)
    dots = torch.stack([torch.dot(v.reshape(-1), g.reshape(-1)) for v, g in zip(velocities, grads)])
    return torch.cat([dots.reshape(1, n), squares.to(dots.dtype)]).t()


def scale_exponent(dot: Tensor, nu_sq: Tensor, g_sq: Tensor, hp: EGHyper) -> Tensor:
    """``γ_s·a_t`` from (possibly summed) dot products; a zero norm gives alignment 0 (elementwise)."""
    if not hp.normalize:
        return _clip(hp.gamma_scale * dot, hp)
    # ‖ν‖·‖g‖ as a product of square roots: the product of the squares can leave the float range
    denom = nu_sq.sqrt() * g_sq.sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(dot))
    return _clip(hp.gamma_scale * cos, hp)


def gain_coefficient(avg_sq: Tensor, g_sq: Tensor, numel: Tensor | int, hp: EGHyper) -> Tensor:
    """``c`` with ``γ_p·z_t = c·(m_{t-1} ⊙ g_t)`` (elementwise over tensors).

    Raw form: ``c = γ_p``. Normalised: ``c = γ_p / (RMS(m_{t-1})·RMS(g_t))``, where
    ``RMS(m)·RMS(g) = ‖m‖·‖g‖ / n``; ``c = 0`` when either norm is 0 (§3.5.2).
    """
    if not hp.normalize:
        return torch.full_like(g_sq, hp.gamma_gain)
    denom = avg_sq.sqrt() * g_sq.sqrt() / torch.as_tensor(numel, dtype=g_sq.dtype).clamp(min=1)
    tiny = torch.finfo(denom.dtype).tiny
    return torch.where(denom > 0, hp.gamma_gain / denom.clamp(min=tiny), torch.zeros_like(denom))


def scope_exponents(scopes: list[str], hps: list[EGHyper], parts: list[Tensor]) -> list[Tensor]:
    """Every tensor's scale exponent ``γ_s·a_t`` (§3.1 step 1), per group: ``parts[k]`` holds the
    :func:`alignment_parts` rows of group ``k``, whose scope is ``scopes[k]``. A ``"tensor"`` scope
    uses each row; ``"group"`` the sum of its group's rows and ``"global"`` the sum of every row of
    every group, in float64 (the shared exponent, expanded over the group's tensors)."""
    total = None
    if "global" in scopes:
        device = parts[0].device
        total = torch.cat([p.to(device, torch.float64) for p in parts]).sum(0)
    out = []
    for scope, hp, part in zip(scopes, hps, parts):
        if scope == "tensor":
            out.append(scale_exponent(part[:, 0], part[:, 1], part[:, 2], hp))
            continue
        summed = total.to(part.device) if scope == "global" else part.double().sum(0)
        out.append(scale_exponent(summed[0], summed[1], summed[2], hp).to(part.dtype).expand(len(part)))
    return out


def adapt_(states: list[dict[str, Tensor]], grads: list[Tensor], part: Tensor, exponent: Tensor,
           numels: Tensor, hp: EGHyper, scratches: Optional[list[Tensor]] = None) -> None:
    """§3.1 steps 1, 2 and 5 for the tensors of one group, before the base step:
    ``s ← s·exp(γ_s·a_t)`` (``exponent``, :func:`scope_exponents`), the gains with the coefficient of
    :func:`gain_coefficient` from the group's ``part`` rows and element counts ``numels``, then
    ``m ← β·m + (1 − β)·g``. ``scratches`` (one buffer per tensor) take the gains' exponent."""
    update_scales_(states, exponent)
    for i, (g, state, c) in enumerate(zip(grads, states, host_gain_coefficients(part, numels, hp))):
        update_gains_(state["gains"], state["avg_grad"], g, hp, c, scratch=None if scratches is None else scratches[i])
    update_average_([s["avg_grad"] for s in states], grads, hp)


def update_scales_(states: list[dict[str, Tensor]], exponent: Tensor) -> None:
    """§3.1 step 1: ``s ← s·exp(γ_s·a_t)`` for every tensor (``exponent`` from :func:`scope_exponents`)."""
    torch._foreach_mul_([s["scale"] for s in states], list(exponent.exp().unbind()))


def host_gain_coefficients(part: Tensor, numels: Tensor, hp: EGHyper) -> list[float]:
    """:func:`gain_coefficient` of every tensor of a group as host floats (``addcmul``'s ``value=``)."""
    coefs = gain_coefficient(part[:, 3], part[:, 2], numels, hp)
    # meta tensors (shape tracing) have none, any value traces alike
    return [0.0] * len(part) if coefs.device.type == "meta" else coefs.tolist()


def update_gains_(gains: Tensor, avg_grad_prev: Tensor, grad: Tensor, hp: EGHyper,
                  coefficient: Optional[float] = None, scratch: Optional[Tensor] = None) -> None:
    """§3.1 step 2: ``p ← p ⊙ exp(clip(c·m_{t-1} ⊙ g_t))``, then clamped to ``[gain_min, gain_max]``.

    ``coefficient`` is :func:`gain_coefficient` as a host float (computed here when not given);
    ``scratch``, a buffer shaped like ``gains``, receives the exponent instead of a fresh temporary.
    """
    if coefficient is None:
        coefficient = float(gain_coefficient(avg_grad_prev.square().sum(), grad.square().sum(), grad.numel(), hp))
    # 0 + c·m⊙g in one pass (the 0-d zero broadcasts)
    z = torch.addcmul(gains.new_zeros(()), avg_grad_prev, grad, value=coefficient, out=scratch)
    gains.mul_(_clip(z, hp).exp_())
    if hp.gain_min is not None or hp.gain_max is not None:
        gains.clamp_(hp.gain_min, hp.gain_max)


def update_average_(avg_grads: list[Tensor], grads: list[Tensor], hp: EGHyper) -> None:
    """§3.1 step 5 for a list of tensors: ``m ← β·m + (1 − β)·g`` (as ``lerp``)."""
    torch._foreach_lerp_(avg_grads, grads, 1.0 - hp.beta)


def apply_(param: Tensor, direction: Tensor, state: dict[str, Tensor], hp: EGHyper) -> None:
    """§3.1 steps 3–4 for one tensor, after the scale and gains of step ``t`` are known.

    ``param`` holds the base's proposal ``θ_{t-1} − d_t`` and becomes ``θ_{t-1} − s_t·ν_t``, written as
    ``param + (d_t − s_t·ν_t)`` so that with γ = 0, μ = 0, η = 1 the base's result comes out bit for bit.
    ``direction`` (``d_t``, in the state dtype) is overwritten with ``d_t − s_t·ν_t``.
    """
    velocity = _velocity_(direction, state, hp)
    param.add_(direction.addcmul_(velocity, state["scale"], value=-1.0))


def sgd_direction_(out: Tensor, grad: Tensor, param: Tensor, lr: float, weight_decay: float) -> Tensor:
    """``d_t = lr·(g + λθ)`` into ``out``: a plain ``torch.optim.SGD`` step, formed as it forms it
    (``g`` already carries ``maximize``'s sign). Read back as ``θ_{t-1} − θ_t`` it would be rounded to
    the spacing of ``θ``'s floats, and a step below half of it lost (see :func:`apply_direct_`)."""
    if weight_decay != 0.0:
        return torch.add(grad, param, alpha=weight_decay, out=out).mul_(lr)
    return torch.mul(grad, lr, out=out)


def apply_direct_(param: Tensor, direction: Tensor, state: dict[str, Tensor], hp: EGHyper) -> None:
    """§3.1 steps 3–4 when the base's step ``d_t`` is known exactly (a plain SGD base) and ``param``
    still holds ``θ_{t-1}``: ``θ_t = θ_{t-1} − s_t·ν_t``, one rounding, as ``torch.optim.SGD`` applies
    its momentum buffer."""
    param.addcmul_(_velocity_(direction, state, hp), state["scale"], value=-1.0)


def _velocity_(direction: Tensor, state: dict[str, Tensor], hp: EGHyper) -> Tensor:
    """``ν_t = μ·ν_{t-1} + η·p_t ⊙ d_t`` in place (state ``velocity``)."""
    gains, velocity = state["gains"], state["velocity"]
    if hp.momentum == 0.0 and hp.lr == 1.0:
        # ν = 0·ν + 1·p⊙d without reading ν (equal up to the sign of zeros)
        return torch.mul(gains, direction, out=velocity)
    return velocity.mul_(hp.momentum).addcmul_(gains, direction, value=hp.lr)


def step_(param: Tensor, grad: Tensor, direction: Tensor, state: dict[str, Tensor], exponent: Tensor,
          hp: EGHyper) -> None:
    """§3.1 steps 1–5 for one tensor, given its scale exponent (from its scope unit).

    ``param`` holds the base's proposal ``θ_{t-1} − d_t`` and becomes ``θ_{t-1} − s_t·ν_t``; ``grad`` is
    read only; ``direction`` is overwritten (see :func:`apply_`). Steps 2 and 5 read only ``g_t`` and
    ``m_{t-1}``, so they run first and ``grad`` may alias ``direction`` (SGD).
    """
    part = alignment_parts([state["velocity"]], [grad], [state["avg_grad"]])
    numels = torch.tensor([grad.numel()], dtype=part.dtype, device=part.device)
    adapt_([state], [grad], part, exponent.reshape(1), numels, hp)
    apply_(param, direction, state, hp)


def su_simplified_step_(param: Tensor, grad: Tensor, gains: Tensor, grad_prev: Tensor, lr: float,
                        gamma: float) -> None:
    """Su's simplified per-coordinate rule (plain SGD), kept as a test oracle:
    ``ν_t = ν_{t-1} ⊙ exp(γ·g_{t-1} ⊙ g_t)``, ``θ_t = θ_{t-1} − η·ν_t ⊙ g_t``."""
    gains.mul_((gamma * grad_prev * grad).exp_())
    param.addcmul_(gains, grad, value=-lr)
    grad_prev.copy_(grad)
