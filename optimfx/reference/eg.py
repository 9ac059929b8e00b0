r"""Exponentiated-gradient step-size adaptation ("Funnel", ``spec/algorithms.md`` §3), reference.

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
bases other than SGD with momentum are optimfx generalisations (marked [unv] in the spec).

References:
    Amid, Anil, Fifty & Warmuth, `Step-size Adaptation Using Exponentiated Gradient Updates
    <https://arxiv.org/abs/2202.00145>`_, 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

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


def _clip(x: Tensor, hp: EGHyper) -> Tensor:
    return x if hp.exp_clip is None else x.clamp_(-hp.exp_clip, hp.exp_clip)


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / max(x.numel(), 1) ** 0.5


def scale_exponent_parts(nu_prev: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(⟨ν_{t-1}, g_t⟩, ‖ν_{t-1}‖², ‖g_t‖²)`` of one tensor; sums of these give group/global alignment."""
    return (torch.dot(nu_prev.flatten(), grad.flatten()), nu_prev.square().sum(), grad.square().sum())


def scale_exponent(dot: Tensor, nu_sq: Tensor, g_sq: Tensor, hp: EGHyper) -> Tensor:
    """``γ_s·a_t`` from (possibly summed) dot products; a zero norm gives alignment 0."""
    if not hp.normalize:
        return _clip(hp.gamma_scale * dot, hp)
    denom = (nu_sq * g_sq).sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(dot))
    return _clip(hp.gamma_scale * cos, hp)


def update_gains_(gains: Tensor, avg_grad_prev: Tensor, grad: Tensor, hp: EGHyper) -> None:
    """§3.1 step 2: ``p ← p ⊙ exp(γ_p·z)`` (then clamped)."""
    z = avg_grad_prev * grad
    if hp.normalize:
        denom = _rms(avg_grad_prev) * _rms(grad)
        z = torch.where(denom > 0, z / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(z))
    gains.mul_(_clip(z.mul_(hp.gamma_gain), hp).exp_())
    if hp.gain_min is not None or hp.gain_max is not None:
        gains.clamp_(hp.gain_min, hp.gain_max)


def step_(param: Tensor, grad: Tensor, direction: Tensor, state: dict[str, Tensor], exponent: Tensor,
          hp: EGHyper) -> None:
    """§3.1 steps 1–5 for one tensor, given its scale exponent (from its scope unit).

    ``param`` holds the base's proposal ``θ_{t-1} − d_t`` and becomes ``θ_{t-1} − s_t·ν_t``, written as
    ``param + (d_t − s_t·ν_t)`` so that with γ = 0, μ = 0, η = 1 the base's result comes out bit for bit.
    """
    scale, gains = state["scale"], state["gains"]
    velocity, avg_grad = state["velocity"], state["avg_grad"]
    scale.mul_(exponent.exp())
    update_gains_(gains, avg_grad, grad, hp)
    velocity.mul_(hp.momentum).addcmul_(gains, direction, value=hp.lr)
    param.add_(direction.addcmul(velocity, scale, value=-1.0))
    avg_grad.lerp_(grad, 1.0 - hp.beta)


def su_simplified_step_(param: Tensor, grad: Tensor, gains: Tensor, grad_prev: Tensor, lr: float,
                        gamma: float) -> None:
    """Su's simplified per-coordinate rule (plain SGD), kept as a test oracle:
    ``ν_t = ν_{t-1} ⊙ exp(γ·g_{t-1} ⊙ g_t)``, ``θ_t = θ_{t-1} − η·ν_t ⊙ g_t``."""
    gains.mul_((gamma * grad_prev * grad).exp_())
    param.addcmul_(gains, grad, value=-lr)
    grad_prev.copy_(grad)
