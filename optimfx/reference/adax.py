r"""AdaX / AdaXW reference, one parameter tensor at a time.

AdaX keeps a long-term-memory second moment. The official recursion on the raw state is

.. math::

    m_t = b_1 m_{t-1} + (1-b_1) g_t,\qquad v_t = (1+b_2) v_{t-1} + b_2 g_t^2,\qquad
    c_t = (1+b_2)^t - 1,\qquad \theta_t = \theta_{t-1} - \alpha\, m_t / (\sqrt{v_t / c_t} + \epsilon_{\rm eff})

The raw ``v_t`` grows like :math:`(1+b_2)^t` and overflows fp32 near 0.9 M steps, so optimfx stores
:math:`\hat v_t = v_t / c_t` and updates it with the stable EMA weight (§2.1)

.. math::

    w_t = b_2 / c_t,\qquad \hat v_t = \hat v_{t-1} + w_t (g_t^2 - \hat v_{t-1})

which equals the raw recursion exactly in real arithmetic (``raw_step_`` is kept as the oracle).

References:
    Li et al, `AdaX: Adaptive Gradient Descent with Exponential Long Term Memory
    <https://arxiv.org/abs/2004.09740>`_, 2020.
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

EPS_MODES = ("official", "adam", "inside")


@dataclass(frozen=True)
class AdaXHyper:
    """Per-group hyperparameters, read from ``param_group`` once per step."""

    beta1: float
    beta2: float
    eps: float
    eps_mode: str
    weight_decay: float
    decoupled: bool
    maximize: bool
    mask: ct.MaskHyper = ct.NO_MASK  # ChildTuning gradient masks (``reference/child_tuning.py``)

    @classmethod
    def from_group(cls, group: dict) -> "AdaXHyper":
        b1, b2 = group["betas"]
        return cls(float(b1), float(b2), float(group["eps"]), group["eps_mode"],
                   float(group["weight_decay"]), bool(group["decoupled"]), bool(group["maximize"]),
                   ct.MaskHyper.from_group(group))


class AdaXScalars(NamedTuple):
    """Host-side float64 scalars of step ``t`` (§2.1 step 1)."""

    weight: float  # w_t = b2 / c_t, the EMA weight of the new g²; w_1 = 1
    eps_eff: float  # eps / sqrt(c_t) ("official") or eps ("adam", "inside")


def init_state(param: torch.Tensor, hp: AdaXHyper) -> dict[str, torch.Tensor]:
    """``exp_avg`` (m) and ``exp_avg_sq`` (v̂), fp32, shaped like the parameter."""
    return {"exp_avg": state_like(param), "exp_avg_sq": state_like(param)}


def log_bias_correction(step: int, beta2: float) -> float:
    """``log c_t`` with ``c_t = (1 + b2)^t - 1``, finite for every step count.

    ``expm1`` overflows float64 past ``t·log1p(b2) ≈ 709.78`` (7.1 M steps at ``b2 = 1e-4``); the log
    form ``x + log(-expm1(-x))`` never does.
    """
    x = step * math.log1p(beta2)
    return x + math.log(-math.expm1(-x))


def host_scalars(step: int, hp: AdaXHyper) -> AdaXScalars:
    log_c = log_bias_correction(step, hp.beta2)
    weight = hp.beta2 * math.exp(-log_c)
    eps_eff = hp.eps * math.exp(-0.5 * log_c) if hp.eps_mode == "official" else hp.eps
    return AdaXScalars(min(weight, 1.0), eps_eff)


#: the smallest EMA weight ``w_t`` ATen's fused Adam kernel reproduces: it takes ``β2 = 1 − w_t`` and
#: recovers the weight as ``1 − β2`` in float64, exact to fp32 precision down to ``2^-26`` (reached
#: after ~88 K steps at the default ``b2 = 1e-4``; later steps take the per-tensor reference)
FUSED_MIN_WEIGHT = 2.0 ** -26


def fused_adam_arguments(hp: AdaXHyper, sc: AdaXScalars, lr: float) -> Optional[FusedAdamArguments]:
    """This step as ATen's fused Adam (:mod:`~optimfx.reference.aten_fused`): ``β2 := 1 − w_t``,
    ``ε := ε_eff``, no bias correction; AdaX's coupled L2 is Adam's, AdaXW's decay AdamW's.
    ``None`` where that is not exact: ``eps_mode="inside"``, ``w_t`` below :data:`FUSED_MIN_WEIGHT`,
    or ``b1 = 1`` (a param group may set it; the kernel's bias correction ``1 − b1^t`` would be 0)."""
    if hp.eps_mode == "inside" or sc.weight < FUSED_MIN_WEIGHT or not hp.beta1 < 1.0:
        return None
    return FusedAdamArguments(decoupled=hp.decoupled, lr=lr, beta1=hp.beta1, beta2=1.0 - sc.weight,
                              weight_decay=hp.weight_decay, eps=sc.eps_eff, maximize=hp.maximize)


def moments_and_denominator_(grad32: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                              hp: AdaXHyper, sc: AdaXScalars,
                              scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Update the moments in place and return the denominator ``sqrt(v̂) + ε_eff`` of the AdaX
    direction ``m / (sqrt(v̂) + ε_eff)``.

    ``scratch`` (optional, may be ``grad32`` itself when that is a private copy) receives the
    denominator instead of a new tensor.
    """
    # §2.1: m ← b1·m + (1 − b1)·g   (no bias correction, as the paper and official code)
    exp_avg.lerp_(grad32, 1.0 - hp.beta1)
    # §2.1: v̂ ← v̂ + w_t·(g² − v̂)
    exp_avg_sq.mul_(1.0 - sc.weight).addcmul_(grad32, grad32, value=sc.weight)
    if hp.eps_mode == "inside":
        return torch.add(exp_avg_sq, sc.eps_eff, out=scratch).sqrt_()
    return denominator_sqrt(exp_avg_sq, sc.eps_eff, zeros_likely=hp.mask.mode == "D", out=scratch).add_(sc.eps_eff)


def step_(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], hp: AdaXHyper,
          sc: AdaXScalars, lr: float) -> None:
    """One AdaX/AdaXW step of one tensor; ``param`` and ``state`` are written, ``grad`` never is."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    param32 = working_copy(param)
    grad32 = prepare_grad(grad, param32, maximize=hp.maximize,
                          l2=0.0 if hp.decoupled else hp.weight_decay, mask=hp.mask, state=state)
    # a private gradient copy (L2, maximize, low precision) is free once the moments are updated;
    # prepare_grad returns ``grad`` itself or a new tensor, never a view of it
    scratch = None if grad32 is grad else grad32
    denom = moments_and_denominator_(grad32, exp_avg, exp_avg_sq, hp, sc, scratch)
    apply_(param32, exp_avg, denom, lr, hp.weight_decay if hp.decoupled else 0.0)
    write_back_(param, param32)


def raw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, raw_v: torch.Tensor,
              step: int, hp: AdaXHyper, lr: float) -> None:
    """The official raw recursion (switchablenorms/AdaX), kept as a test oracle only.

    ``raw_v`` holds the unnormalised ``v_t``; the step size is ``lr·sqrt(c_t)`` and ε sits on
    ``sqrt(v_t)``, so this matches ``eps_mode="official"``.
    """
    grad = prepare_grad(grad, param, maximize=hp.maximize, l2=0.0 if hp.decoupled else hp.weight_decay)
    if hp.decoupled:
        param.mul_(1.0 - lr * hp.weight_decay)
    exp_avg.mul_(hp.beta1).add_(grad, alpha=1.0 - hp.beta1)
    raw_v.mul_(1.0 + hp.beta2).addcmul_(grad, grad, value=hp.beta2)
    c_t = (1.0 + hp.beta2) ** step - 1.0
    param.addcdiv_(exp_avg, raw_v.sqrt().add_(hp.eps), value=-lr * math.sqrt(c_t))
