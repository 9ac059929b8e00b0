r"""AdamW reference, with the options ChildTuning's official optimizer needs.

.. math::

    \tilde g_t &= \mathrm{mask}(g_t) \quad\text{(ChildTuning; identity when off)}\\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g_t^2\\
    d_t &= c_1 m_t / (c_2 \sqrt{v_t} + \epsilon)

with ``c1 = 1/(1−β1^t), c2 = 1/sqrt(1−β2^t)`` when ε sits on ``sqrt(v̂)`` (``torch.optim.AdamW``), or
``c1 = sqrt(1−β2^t)/(1−β1^t), c2 = 1`` when ε sits on ``sqrt(v)`` (the legacy transformers AdamW used by
ChildTuning's official code); ``c1 = c2 = 1`` without bias correction. Decay order ``"torch"``:
``θ ← θ(1 − lr·λ) − lr·d``; ``"alicemind"``: ``θ ← (θ − lr·d)(1 − lr·λ)``.

References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization <https://arxiv.org/abs/1711.05101>`_, 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .._precision import state_like, working_copy, write_back_
from . import child_tuning as ct
from .aten_fused import FusedAdamArguments
from .common import apply_, denominator_sqrt, prepare_grad

EPS_PLACEMENTS = ("v_hat", "v")
DECAY_ORDERS = ("torch", "alicemind")


@dataclass(frozen=True)
class AdamWHyper:
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    correct_bias: bool
    eps_placement: str
    decay_order: str
    maximize: bool
    mask: ct.MaskHyper = ct.NO_MASK  # ChildTuning (``reference/child_tuning.py``)

    @classmethod
    def from_group(cls, group: dict) -> "AdamWHyper":
        b1, b2 = group["betas"]
        return cls(float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]),
                   bool(group["correct_bias"]), group["eps_placement"], group["decay_order"],
                   bool(group["maximize"]), ct.MaskHyper.from_group(group))


class AdamWScalars(NamedTuple):
    step: int
    c1: float  # multiplies m
    c2: float  # multiplies sqrt(v)


def init_state(param: torch.Tensor, hp: AdamWHyper) -> dict[str, torch.Tensor]:
    """``exp_avg`` and ``exp_avg_sq``, fp32, shaped like the parameter (ChildTuning adds its own keys)."""
    return {"exp_avg": state_like(param), "exp_avg_sq": state_like(param)}


def host_scalars(step: int, hp: AdamWHyper) -> AdamWScalars:
    if not hp.correct_bias:
        return AdamWScalars(step, 1.0, 1.0)
    # 1 − β^t = −expm1(t·log β), accurate for β near 1
    bc1 = -math.expm1(step * math.log(hp.beta1)) if hp.beta1 > 0 else 1.0
    bc2 = -math.expm1(step * math.log(hp.beta2)) if hp.beta2 > 0 else 1.0
    if hp.eps_placement == "v_hat":
        return AdamWScalars(step, 1.0 / bc1, 1.0 / math.sqrt(bc2))
    return AdamWScalars(step, math.sqrt(bc2) / bc1, 1.0)


def fused_adam_arguments(hp: AdamWHyper, sc: AdamWScalars, lr: float) -> Optional[FusedAdamArguments]:
    """This step as ATen's fused AdamW (:mod:`~optimfx.reference.aten_fused`), bias corrections folded
    into the scalars: ``lr·c1·m / (c2·√v + ε) = lr'·m / (√v + ε/c2)`` with ``lr' = lr·c1/c2``, and
    ``λ' = λ·c2/c1`` keeps the decay ``lr'·λ' = lr·λ``. ``None`` for weight decay after the step
    (``"alicemind"`` order, the kernel decays first), ``β = 1`` (the kernel's switched-off bias
    correction needs ``β < 1``) and an ``ε/c2`` below fp32's smallest normal (the kernel rounds it to
    fp32, where the reference adds ``ε`` itself: a subnormal ``ε`` would become 0 and ``0/0``)."""
    if hp.decay_order != "torch" and hp.weight_decay != 0.0 or not (hp.beta1 < 1.0 and hp.beta2 < 1.0):
        return None
    if 0.0 < hp.eps / sc.c2 < torch.finfo(torch.float32).tiny:
        return None
    ratio = sc.c1 / sc.c2
    return FusedAdamArguments(decoupled=True, lr=lr * ratio, beta1=hp.beta1, beta2=hp.beta2,
                              weight_decay=hp.weight_decay / ratio, eps=hp.eps / sc.c2, maximize=hp.maximize)


def moments_and_denominator_(grad32: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                              hp: AdamWHyper, sc: AdamWScalars) -> torch.Tensor:
    """Update the moments in place and return the denominator ``c2·sqrt(v) + ε`` of the direction
    ``m / (c2·sqrt(v) + ε)`` (``c1`` is applied with lr)."""
    exp_avg.lerp_(grad32, 1.0 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(grad32, grad32, value=1.0 - hp.beta2)
    # c2 = 1 unless the bias correction acts on v̂ (host_scalars)
    scaled = hp.correct_bias and hp.eps_placement == "v_hat"
    denom = denominator_sqrt(exp_avg_sq, hp.eps, sc.c2 if scaled else 1.0, zeros_likely=hp.mask.mode == "D")
    if scaled:
        denom.mul_(sc.c2)
    return denom.add_(hp.eps)


def step_(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], hp: AdamWHyper,
          sc: AdamWScalars, lr: float) -> None:
    """One AdamW step of one tensor; ``param`` and ``state`` are written, ``grad`` never is."""
    param32 = working_copy(param)
    # §4.1: the ChildTuning mask acts on the gradient, before the moments
    grad32 = prepare_grad(grad, param32, maximize=hp.maximize, l2=0.0, mask=hp.mask, state=state)
    denom = moments_and_denominator_(grad32, state["exp_avg"], state["exp_avg_sq"], hp, sc)
    apply_(param32, state["exp_avg"], denom, lr, hp.weight_decay, direction_scale=sc.c1,
           decay_first=hp.decay_order == "torch")
    write_back_(param, param32)
