r"""AdaFactor reference (``spec/algorithms.md`` §1), written as a composition of small pieces.

Per tensor, in the order the kernels run it (§1.1)::

    ρ_t  = min(1e-2, 1/√t)            relative step (warm-up: min(1e-6·t, 1/√t)); or the external lr
    α_t  = max(ε2, RMS(θ_{t-1}))·ρ_t   parameter scale (scale_parameter)
    R    ← β̂2t·R + w_t·mean_j(G² + ε1)     C ← β̂2t·C + w_t·mean_i(G² + ε1)      w_t = t^-0.8 = 1 − β̂2t
    U    = G / sqrt(R_i·C_j / R̄)          (unfactored: V ← β̂2t·V + w_t·(G² + ε1), U = G / sqrt(V))
    Û    = U / max(1, RMS(U)/d)           update clipping
    M    ← β1·M + (1 − β1)·α_t·Û          optional momentum on the scaled update (reference-code placement)
    θ    ← θ − λ·α_t·θ − α_t·Û  (or − M)

Factoring acts on the last two axes of a tensor with ``ndim ≥ 2``; leading axes are batch axes.
Everything stays on the device: no ``.item()``; RMS values are 0-d tensors.

References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from .._precision import compute_dtype, working_copy, write_back_
from .common import prepare_grad

Tensor = torch.Tensor
Scalar = Union[float, Tensor]

LR_MODES = ("scale", "rho_max")
EPS_MODES = ("paper", "torch")
DECAY_MODES = ("hf", "torch")


@dataclass(frozen=True)
class AdaFactorHyper:
    """Per-group hyperparameters (names as ``transformers.optimization.Adafactor``)."""

    eps1: Optional[float]
    eps2: float
    clip_threshold: float
    decay_rate: float
    beta1: Optional[float]
    weight_decay: float
    scale_parameter: bool
    relative_step: bool
    warmup_init: bool
    min_dim_size_to_factor: Optional[int]
    beta2_cap: Optional[float]
    lr_mode: str
    eps_mode: str
    decay_mode: str
    maximize: bool

    @classmethod
    def from_group(cls, group: dict) -> "AdaFactorHyper":
        eps1, eps2 = group["eps"]
        return cls(
            None if eps1 is None else float(eps1), float(eps2), float(group["clip_threshold"]),
            float(group["decay_rate"]), None if group["beta1"] is None else float(group["beta1"]),
            float(group["weight_decay"]), bool(group["scale_parameter"]), bool(group["relative_step"]),
            bool(group["warmup_init"]), group["min_dim_size_to_factor"],
            None if group["beta2_cap"] is None else float(group["beta2_cap"]),
            group["lr_mode"], group["eps_mode"], group["decay_mode"], bool(group["maximize"]),
        )


class AdaFactorScalars(NamedTuple):
    """Host-side float64 scalars of step ``t`` (§1.1 phase H)."""

    weight: float  # w_t = 1 − β̂2t, the EMA weight of the new statistic (w_1 = 1)
    rho: float  # relative step ρ_t (1.0 when relative_step is off)
    inv_sqrt_step: float  # 1/√t, for lr_mode="rho_max"


def is_factored(shape: torch.Size, hp: AdaFactorHyper) -> bool:
    """Factor the last two axes when ``ndim ≥ 2`` (and both are ≥ ``min_dim_size_to_factor`` if set)."""
    if len(shape) < 2:
        return False
    return hp.min_dim_size_to_factor is None or min(shape[-2], shape[-1]) >= hp.min_dim_size_to_factor


def init_state(param: Tensor, hp: AdaFactorHyper) -> dict[str, Tensor]:
    """Factored: ``exp_avg_sq_row [..., n_r]``, ``exp_avg_sq_col [..., n_c]``; else ``exp_avg_sq``.

    Key names and shapes are those of ``transformers``' Adafactor, so its checkpoints load directly.
    """
    kw = dict(dtype=compute_dtype(param.dtype), device=param.device)
    shape = param.shape
    state = {}
    if is_factored(shape, hp):
        state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **kw)
        state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **kw)
    else:
        state["exp_avg_sq"] = torch.zeros(shape, **kw)
    if hp.beta1 is not None:
        state["exp_avg"] = torch.zeros(shape, **kw)
    return state


def host_scalars(step: int, hp: AdaFactorHyper) -> AdaFactorScalars:
    # §1.1 step 2: β̂2t = 1 − t^decay_rate, optionally capped (Zhai et al. 2021)
    weight = step ** hp.decay_rate
    if hp.beta2_cap is not None:
        weight = max(weight, 1.0 - hp.beta2_cap)
    inv_sqrt = 1.0 / math.sqrt(step)
    # §1.1 step 3: relative step
    if not hp.relative_step:
        rho = 1.0
    elif hp.warmup_init:
        rho = min(1e-6 * step, inv_sqrt)
    else:
        rho = min(1e-2, inv_sqrt)
    return AdaFactorScalars(min(weight, 1.0), rho, inv_sqrt)


def step_size(lr: Scalar, sc: AdaFactorScalars, hp: AdaFactorHyper) -> Scalar:
    """ρ_t before the parameter scale; ``lr`` multiplies it, or caps it in torch's ``rho_max`` mode."""
    if hp.relative_step and hp.lr_mode == "rho_max":
        return min(lr, sc.inv_sqrt_step)
    return lr * sc.rho


def rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


def param_scale(param32: Tensor, hp: AdaFactorHyper) -> Scalar:
    """§1.1 step 6: ``max(ε2, RMS(θ_{t-1}))`` (a 0-d tensor), or 1 without ``scale_parameter``."""
    return rms(param32).clamp_(min=hp.eps2) if hp.scale_parameter else 1.0


def _eps1(hp: AdaFactorHyper, param_dtype: torch.dtype) -> float:
    # torch.optim.Adafactor: eps1=None means the machine epsilon of the parameter dtype
    return torch.finfo(param_dtype).eps if hp.eps1 is None else hp.eps1


def _mean_sq(grad32: Tensor, dim: int) -> Tensor:
    # mean(G²) along dim without a full-size G² temporary
    return torch.linalg.vector_norm(grad32, dim=dim).square_().div_(grad32.shape[dim])


def factored_direction(grad32: Tensor, row: Tensor, col: Tensor, hp: AdaFactorHyper,
                       sc: AdaFactorScalars, eps1: float) -> Tensor:
    """§1.1 steps 5, 7–9 (factored): update ``R``, ``C`` in place and return ``U = G / sqrt(V̂)``."""
    add = eps1 if hp.eps_mode == "paper" else 0.0
    row.lerp_(_mean_sq(grad32, -1).add_(add), sc.weight)
    col.lerp_(_mean_sq(grad32, -2).add_(add), sc.weight)
    row_mean = row.mean(dim=-1, keepdim=True)
    if hp.eps_mode == "paper":
        # V̂_ij = R_i·C_j / R̄; R̄ ≥ ε1 > 0 already, the clamp only guards a user ε1 of 0
        r_factor = (row / row_mean.clamp(min=torch.finfo(row.dtype).tiny)).rsqrt_()
        return (grad32 * r_factor.unsqueeze(-1)).mul_(col.rsqrt().unsqueeze(-2))
    # torch.optim.Adafactor: V̂ = R·C / max(R̄, ε1), U = G / sqrt(max(V̂, ε1²))
    v_hat = (row.unsqueeze(-1) * col.unsqueeze(-2)).div_(row_mean.clamp(min=_floor(eps1, row)).unsqueeze(-1))
    return v_hat.clamp_(min=_floor(eps1 * eps1, row)).rsqrt_().mul_(grad32)


def _floor(value: float, like: Tensor) -> float:
    """A clamp floor that stays positive in ``like``'s dtype (ε1² = 1e-60 underflows fp32 to 0, and a
    zero row would then give 0·rsqrt(0) = NaN; torch.optim.Adafactor has that NaN, optimfx does not)."""
    return max(value, torch.finfo(like.dtype).tiny)


def unfactored_direction(grad32: Tensor, v: Tensor, hp: AdaFactorHyper, sc: AdaFactorScalars,
                         eps1: float) -> Tensor:
    """§1.1 step 8–9 (unfactored): ``V ← β̂2t·V + w_t·(G² + ε1)``, return ``U = G / sqrt(V)``."""
    if hp.eps_mode == "paper":
        v.mul_(1.0 - sc.weight).addcmul_(grad32, grad32, value=sc.weight).add_(sc.weight * eps1)
        return v.rsqrt().mul_(grad32)
    v.lerp_(grad32 * grad32, sc.weight)
    return v.clamp(min=_floor(eps1 * eps1, v)).rsqrt_().mul_(grad32)


def clip_scale(update: Tensor, hp: AdaFactorHyper) -> Tensor:
    """§1.1 step 10: ``1 / max(1, RMS(U)/d)`` as a 0-d tensor."""
    return (rms(update) / hp.clip_threshold).clamp_(min=1.0).reciprocal_()


def step_(param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: AdaFactorHyper,
          sc: AdaFactorScalars, lr: float) -> None:
    """One AdaFactor step of one tensor; ``param`` and ``state`` are written, ``grad`` never is."""
    if param.numel() == 0:
        return
    param32 = working_copy(param)
    grad32 = prepare_grad(grad, param32, maximize=hp.maximize, l2=0.0)
    eps1 = _eps1(hp, param.dtype)
    alpha = param_scale(param32, hp) * step_size(lr, sc, hp)
    if "exp_avg_sq_row" in state:
        update = factored_direction(grad32, state["exp_avg_sq_row"], state["exp_avg_sq_col"], hp, sc, eps1)
    else:
        update = unfactored_direction(grad32, state["exp_avg_sq"], hp, sc, eps1)
    scale = clip_scale(update, hp) * alpha  # α_t / κ
    if hp.beta1 is not None:
        # §1.1 step 12: EMA of the scaled, clipped update (tensor2tensor / HF / optax placement)
        state["exp_avg"].mul_(hp.beta1).addcmul_(update, scale, value=1.0 - hp.beta1)
    if hp.weight_decay != 0.0:
        # HF/fairseq: θ −= λ·α_t·θ;  torch.optim.Adafactor: θ *= 1 − lr·λ
        param32.mul_(1.0 - hp.weight_decay * (alpha if hp.decay_mode == "hf" else lr))
    if hp.beta1 is not None:
        param32.sub_(state["exp_avg"])
    else:
        param32.addcmul_(update, scale, value=-1.0)
    write_back_(param, param32)
