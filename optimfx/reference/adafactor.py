r"""AdaFactor reference, written as a composition of small pieces.

Per tensor, in the order the kernels run it (§1.1)::

    ρ_t  = min(1e-2, 1/√t)            relative step (warm-up: min(1e-6·t, 1/√t)); or the external lr
    α_t  = max(ε2, RMS(θ_{t-1}))·ρ_t   parameter scale (scale_parameter)
    R    ← β̂2t·R + w_t·mean_j(G² + ε1)     C ← β̂2t·C + w_t·mean_i(G² + ε1)      w_t = t^-0.8 = 1 − β̂2t
    U    = G / sqrt(R_i·C_j / R̄)          (unfactored: V ← β̂2t·V + w_t·(G² + ε1), U = G / sqrt(V))
    Û    = U / max(1, RMS(U)/d)           update clipping
    M    ← β1·M + (1 − β1)·α_t·Û          optional momentum on the scaled update (reference-code placement)
    θ    ← θ − λ·α_t·θ − α_t·Û  (or − M)

Factoring acts on the last two axes of a tensor with ``ndim ≥ 2``; leading axes are batch axes.
A *stack* (``stacked=True``: same-shape tensors stacked on a new leading axis, the CPU path for
small tensors, ``optimfx/reference/stacking.py``) takes the step of each of its slices: its RMS
values are per slice (shape ``[B, 1, …]``), everything else is already per leading index.
On an FSDP2 shard (``ShardSpec`` under ``_distributed.SHARD_KEY`` in ``state``) every mean and RMS
over a sharded axis is completed across ranks (``optimfx/_distributed.py``), so a sharded run takes
the single-process step.
Everything stays on the device: no ``.item()``; RMS values are 0-d tensors.

References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, 2018.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from .. import _distributed
from .._kernels import cpu_adafactor
from .._precision import compute_dtype, working_copy, write_back_
from . import batched_masks
from . import child_tuning as ct
from . import common
from .common import prepare_grad

Tensor = torch.Tensor
Scalar = Union[float, Tensor]
Shard = _distributed.ShardSpec

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
    mask: ct.MaskHyper = ct.NO_MASK  # ChildTuning gradient masks (``reference/child_tuning.py``)

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
            ct.MaskHyper.from_group(group),
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


#: the parameter axis each factored statistic averages over (their FSDP2 placement follows from it)
REDUCED_AXES = {"exp_avg_sq_row": -1, "exp_avg_sq_col": -2}


def rms(x: Tensor, shard: Optional[Shard] = None, stacked: bool = False) -> Tensor:
    if shard is not None:
        return _distributed.rms(x, shard)
    return sum_sq(x, stacked).div_(_numel(x, stacked)).sqrt_()


def _numel(x: Tensor, stacked: bool) -> int:
    """Elements of one tensor: the whole of ``x``, or one slice of a stack."""
    return x[0].numel() if stacked else x.numel()


def param_scale(param32: Tensor, hp: AdaFactorHyper, shard: Optional[Shard] = None,
                stacked: bool = False) -> Scalar:
    """§1.1 step 6: ``max(ε2, RMS(θ_{t-1}))`` (a 0-d tensor, per slice for a stack), or 1 without
    ``scale_parameter``."""
    return rms(param32, shard, stacked).clamp_(min=hp.eps2) if hp.scale_parameter else 1.0


def _eps1(hp: AdaFactorHyper, param_dtype: torch.dtype) -> float:
    # torch.optim.Adafactor: eps1=None means the machine epsilon of the parameter dtype
    return torch.finfo(param_dtype).eps if hp.eps1 is None else hp.eps1


class _Scratch(threading.local):
    """Tensors a step reuses instead of allocating: one full-size buffer per (device, dtype), grown to
    the largest tensor stepped, and small constant vectors (``1/n`` weights, ``ε1`` fills).

    A fresh full-size temporary per tensor and step costs page faults on CPU (large allocations are
    fresh ``mmap``s): on the 25.7 M-element embedding of the ``transformer-50m`` benchmark preset
    that took several times longer than the maths. The buffer stays allocated between steps (one
    largest tensor's worth of memory; :func:`free_scratch` releases it). Per thread, so optimizers
    stepping in different threads never share it. Under ``torch.compile`` plain allocations are
    used: the compiler plans its own buffers.
    """

    def __init__(self) -> None:
        self.flat: dict[tuple, Tensor] = {}
        self.views: dict[tuple, Tensor] = {}
        self.constants: dict[tuple, Tensor] = {}

    def buffer(self, like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor shaped like ``like`` (same dtype and device)."""
        if torch.compiler.is_compiling():
            return torch.empty(like.shape, dtype=like.dtype, device=like.device)
        key = (like.shape, like.dtype, like.device)
        view = self.views.get(key)
        if view is None:
            base = (like.dtype, like.device)
            flat = self.flat.get(base)
            if flat is None or flat.numel() < like.numel():
                flat = self.flat[base] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
                # views of the replaced buffer would keep it alive
                self.views = {k: v for k, v in self.views.items() if k[1:] != base}
            view = self.views[key] = flat[: like.numel()].view(like.shape)
        return view

    def constant(self, n: int, value: float, like: Tensor) -> Tensor:
        """The vector ``[value] * n`` in ``like``'s dtype and device (read only)."""
        if torch.compiler.is_compiling():
            return torch.full((n,), value, dtype=like.dtype, device=like.device)
        key = (n, value, like.dtype, like.device)
        out = self.constants.get(key)
        if out is None:
            out = self.constants[key] = torch.full((n,), value, dtype=like.dtype, device=like.device)
        return out


_SCRATCH = _Scratch()


def free_scratch() -> None:
    """Release this thread's reusable buffers, the ChildTuning batch buffers and the C kernel's
    cached scratch included (the next step allocates them again)."""
    _SCRATCH.__init__()
    batched_masks.free_scratch()
    cpu_adafactor.free_scratch()


def load_grad(grad: Tensor, param32: Tensor, state: dict[str, Tensor], hp: AdaFactorHyper) -> Tensor:
    """The gradient the step reads: the compute dtype, ChildTuning-masked, negated for ``maximize``;
    ``grad`` itself is never written."""
    return prepare_grad(grad, param32, maximize=hp.maximize, l2=0.0, mask=hp.mask, state=state)


def square(grad32: Tensor) -> Tensor:
    """``G²`` in the reused buffer: the one full-size temporary of a step (``U``, or ``G ⊙ a`` in the
    factored form, is written over it once the statistics have read it)."""
    return torch.mul(grad32, grad32, out=_SCRATCH.buffer(grad32))


def sum_sq(x: Tensor, stacked: bool = False) -> Tensor:
    """``Σ x²`` (a fresh 0-d tensor, :func:`~optimfx.reference.common.sum_sq`); for a stack, the sum of
    each slice, shaped ``[B, 1, …]`` to broadcast against ``x`` (a row-wise ``vector_norm``: on CPU
    ~20x faster than a batched BLAS dot of 16 × 16 K elements)."""
    if stacked:
        norms = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
        return norms.square_().view(per_slice_shape(x))
    return common.sum_sq(x)


def per_slice_shape(x: Tensor) -> tuple[int, ...]:
    """``[B, 1, …]``: one value per slice of the stack ``x``, broadcastable against it."""
    return (x.shape[0],) + (1,) * (x.dim() - 1)


def _mean_plus(g2: Tensor, dim: int, add: float) -> Tensor:
    """``mean(G², dim) + add``: one ATen sum over the ``G²`` buffer (one read, still in cache after
    it was written), then a scale and a shift of the short result.

    On CPU a strided ``vector_norm(G, dim=-2)`` is ~20x slower than this sum; a BLAS gemv against a
    ``1/n`` vector is ~1.5x slower, and on small tensors it wakes OpenMP workers that ATen leaves idle
    below its grain size (their spinning stalled steps on a loaded 2-core machine).
    """
    total = g2.sum(dim).mul_(1.0 / g2.shape[dim])
    return total.add_(add) if add else total


def row_col_mean_sq(grad32: Tensor, g2: Tensor, add: float,
                    shard: Optional[Shard] = None) -> tuple[Tensor, Tensor]:
    """§1.1 step 5: ``r_i = mean_j G²_ij + add`` and ``c_j = mean_i G²_ij + add`` over the last two
    axes, from the ``G²`` buffer (``add`` is ε1 in the paper's form, 0 in torch's). On an FSDP2 shard
    the means are completed across ranks."""
    if shard is not None:
        return (_distributed.mean_sq(grad32, -1, shard).add_(add),
                _distributed.mean_sq(grad32, -2, shard).add_(add))
    return _mean_plus(g2, -1, add), _mean_plus(g2, -2, add)


def _row_mean(row: Tensor, shard: Optional[Shard]) -> Tensor:
    """``R̄`` per leading index, broadcastable against ``row`` (over the global rows on an FSDP2
    shard). A BLAS dot/gemv with the constant ``1/n`` vector: cheaper than ``mean`` on short rows."""
    row_shard = None if shard is None else shard.reduced(-1)
    if row_shard is None:
        weights = _SCRATCH.constant(row.shape[-1], 1.0 / row.shape[-1], row)
        if row.dim() == 1:
            return torch.dot(row, weights)
        return torch.mv(row.flatten(0, -2), weights).view(row.shape[:-1] + (1,))
    return _distributed.mean(row, -1, row_shard, keepdim=True)


def _weighted_total_(g2: Tensor, a: Tensor, b: Tensor, stacked: bool = False) -> Tensor:
    """``Σ_i a_i Σ_j G²_ij b_j`` over every leading index (0-d; per slice, ``[B, 1, …]``, for a stack);
    scales the ``G²`` buffer in place (it is not read again), then one row sum (ATen, for the reason
    in :func:`_mean_plus`)."""
    rows = g2.mul_(b.unsqueeze(-2)).sum(-1)
    if stacked:
        return sum_products(rows, a).view(per_slice_shape(g2))
    return torch.dot(rows.view(-1), a.view(-1))


def sum_products(x: Tensor, y: Tensor) -> Tensor:
    """``Σ x ⊙ y`` over all but the leading axis (shape ``[B]``)."""
    return torch.linalg.vecdot(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1))


def paper_factored_update(grad32: Tensor, g2: Tensor, row: Tensor, col: Tensor, pscale: Scalar,
                          hp: AdaFactorHyper, eps1: float, shard: Optional[Shard] = None,
                          stacked: bool = False) -> tuple[Tensor, Tensor]:
    r"""§1.1 steps 8–10, paper form, without forming ``U``: returns ``(G ⊙ a, κ⁻¹·s·b)`` (the first
    written over the ``G²`` buffer once it is read; ``s`` the parameter scale), whose broadcast
    product is ``κ⁻¹·s·U``.

    ``V̂_ij = R_i·C_j / R̄`` factors: ``U_ij = G_ij·a_i·b_j`` with ``a_i² = R̄/R_i`` and ``b_j² = 1/C_j``,
    so ``ΣU² = Σ_i a_i² Σ_j G²_ij b_j²``: one more pass over the ``G²`` buffer, no ``U``.
    """
    tiny = torch.finfo(row.dtype).tiny
    row_mean = _row_mean(row, shard)
    if eps1 < tiny:
        # R_i, C_j ≥ ε1 > 0 otherwise; a user ε1 below tiny (or 0) leaves zero rows/columns at 0
        row_mean.clamp_(min=tiny)
        col = col.clamp(min=tiny)
    # the cap keeps R̄/R_i finite for a zero row next to huge gradients; G multiplies a before b, so a
    # zero row or column (a_i or b_j near the cap) stays a zero update
    a_sq = torch.div(row_mean, row).clamp_(max=1.0 / tiny)
    b_sq = col.reciprocal()
    if eps1 < tiny:
        # G² may have underflowed where G·a·b does not (a, b reach 1/√tiny): ΣU² is measured on the
        # update as applied, one more pass, so that the clip bounds it
        g_a = torch.mul(grad32, a_sq.sqrt_().unsqueeze(-1), out=g2)
        b = b_sq.sqrt_().unsqueeze(-2)
        scale = clip_scale(sum_sq(g_a * b, stacked), _numel(g2, stacked), hp, shard).mul_(pscale)
        return g_a, b.mul_(scale)
    total = _weighted_total_(g2, a_sq, b_sq, stacked)
    scale = clip_scale(total, _numel(g2, stacked), hp, shard).mul_(pscale)
    g_a = torch.mul(grad32, a_sq.sqrt_().unsqueeze(-1), out=g2)
    return g_a, b_sq.sqrt_().unsqueeze(-2).mul_(scale)


def torch_factored_direction(grad32: Tensor, g2: Tensor, row: Tensor, col: Tensor, eps1: float,
                             shard: Optional[Shard] = None) -> Tensor:
    """torch.optim.Adafactor's form: ``V̂ = R·C / max(R̄, ε1)``, ``U = G / sqrt(max(V̂, ε1²))``, written
    over the ``G²`` buffer."""
    r = row / _row_mean(row, shard).clamp_(min=_floor(eps1, row))
    v_hat = torch.mul(r.unsqueeze(-1), col.unsqueeze(-2), out=g2)
    return v_hat.clamp_(min=_floor(eps1 * eps1, row)).rsqrt_().mul_(grad32)


def factored_update(grad32: Tensor, g2: Tensor, row: Tensor, col: Tensor, pscale: Scalar,
                    hp: AdaFactorHyper, sc: AdaFactorScalars, eps1: float,
                    shard: Optional[Shard] = None, stacked: bool = False) -> tuple[Tensor, Tensor]:
    """§1.1 steps 5, 7–10 (factored): ``R ← β̂2t·R + w_t·r``, ``C ← β̂2t·C + w_t·c`` in place (``lerp``
    with ``w_1 = 1`` returns ``r``, ``c`` exactly at step 1); returns ``(u, v)`` with
    ``α_t·Û = ρ_t·(u ⊙ v)`` (broadcasting)."""
    paper = hp.eps_mode == "paper"
    row_stat, col_stat = row_col_mean_sq(grad32, g2, eps1 if paper else 0.0, shard)
    row.lerp_(row_stat, sc.weight)
    col.lerp_(col_stat, sc.weight)
    if paper:
        return paper_factored_update(grad32, g2, row, col, pscale, hp, eps1, shard, stacked)
    update = torch_factored_direction(grad32, g2, row, col, eps1, shard)
    return update, _update_scale(update, pscale, hp, shard, stacked)


def _update_scale(update: Tensor, pscale: Scalar, hp: AdaFactorHyper, shard: Optional[Shard],
                  stacked: bool) -> Tensor:
    """``κ⁻¹·s`` for a formed update ``U``."""
    total = sum_sq(update, stacked)
    return clip_scale(total, _numel(update, stacked), hp, shard).mul_(pscale)


def _floor(value: float, like: Tensor) -> float:
    """A clamp floor that stays positive in ``like``'s dtype (ε1² = 1e-60 underflows fp32 to 0, and a
    zero row would then give 0·rsqrt(0) = NaN; torch.optim.Adafactor has that NaN, optimfx does not)."""
    return max(value, torch.finfo(like.dtype).tiny)


def unfactored_update(grad32: Tensor, g2: Tensor, v: Tensor, pscale: Scalar, hp: AdaFactorHyper,
                      sc: AdaFactorScalars, eps1: float, shard: Optional[Shard] = None,
                      stacked: bool = False) -> tuple[Tensor, Tensor]:
    """§1.1 steps 8–10 (unfactored): ``V ← β̂2t·V + w_t·(G² + ε1)`` (torch form: no ε1), then
    ``U = G / sqrt(V)`` (torch form: ``sqrt(max(V, ε1²))``) written over the ``G²`` buffer; returns
    ``(U, κ⁻¹·s)`` with ``α_t·Û = ρ_t·U·κ⁻¹·s``."""
    paper = hp.eps_mode == "paper"
    if paper and eps1 != 0.0:
        g2.add_(eps1)
    v.lerp_(g2, sc.weight)
    if paper and eps1 >= torch.finfo(v.dtype).tiny:
        update = torch.rsqrt(v, out=g2)  # V ≥ ε1 > 0
    else:
        update = torch.clamp(v, min=_floor(0.0 if paper else eps1 * eps1, v), out=g2).rsqrt_()
    update.mul_(grad32)
    return update, _update_scale(update, pscale, hp, shard, stacked)


def clip_scale(total: Tensor, numel: int, hp: AdaFactorHyper, shard: Optional[Shard] = None) -> Tensor:
    """§1.1 step 10: ``κ⁻¹ = 1 / max(1, RMS(U)/d)`` (a fresh tensor shaped like ``total``) from
    ``ΣU² = total`` over ``numel`` elements.

    On an FSDP2 shard ``total`` is this rank's part: ``‖√total‖² = total``, so the sharded RMS of
    ``√total`` sums the ranks' parts over the global element count.
    """
    if shard is not None:
        return (_distributed.rms(total.sqrt(), shard) / hp.clip_threshold).clamp_(min=1.0).reciprocal_()
    return total.div(numel * hp.clip_threshold ** 2).clamp_(min=1.0).rsqrt_()


def apply_(param32: Tensor, state: dict[str, Tensor], u: Tensor, v: Tensor, step: float, pscale: Scalar,
           lr: float, hp: AdaFactorHyper) -> None:
    """§1.1 steps 12–14 with ``α_t·Û = ρ_t·(u ⊙ v)``: optional momentum ``M ← β1·M + (1 − β1)·α_t·Û``,
    weight decay, then ``θ ← θ − (M or α_t·Û)`` as one fused ``addcmul_``."""
    if hp.beta1 is not None:
        # §1.1 step 12: EMA of the scaled, clipped update (tensor2tensor / HF / optax placement)
        state["exp_avg"].mul_(hp.beta1).addcmul_(u, v, value=(1.0 - hp.beta1) * step)
    if hp.weight_decay != 0.0:
        # HF/fairseq: θ −= λ·α_t·θ with α_t = ρ_t·s;  torch.optim.Adafactor: θ *= 1 − lr·λ
        param32.mul_(1.0 - hp.weight_decay * (pscale * step if hp.decay_mode == "hf" else lr))
    if hp.beta1 is not None:
        param32.sub_(state["exp_avg"])
    else:
        param32.addcmul_(u, v, value=-step)


def step_(param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: AdaFactorHyper,
          sc: AdaFactorScalars, lr: float, stacked: bool = False) -> None:
    """One AdaFactor step of one tensor; ``param`` and ``state`` are written, ``grad`` never is.

    ``α_t = ρ_t·s`` is kept in two parts: the host float ``ρ_t`` (:func:`step_size`) and the 0-d
    parameter scale ``s`` (:func:`param_scale`); the update is ``ρ_t·(u ⊙ v)``.

    ``stacked=True``: ``param``, ``grad`` and the state are stacks of same-shape tensors (leading
    axis), and each slice takes its own step (``s`` and ``κ`` per slice).
    """
    shard = state.get(_distributed.SHARD_KEY)
    # an empty shard still takes part in its ranks' all-reduces
    if param.numel() == 0 and shard is None:
        return
    param32 = working_copy(param)
    grad32 = load_grad(grad, param32, state, hp)
    eps1 = _eps1(hp, param.dtype)
    step = step_size(lr, sc, hp)
    pscale = param_scale(param32, hp, shard, stacked)
    g2 = square(grad32)
    if "exp_avg_sq_row" in state:
        u, v = factored_update(grad32, g2, state["exp_avg_sq_row"], state["exp_avg_sq_col"], pscale, hp, sc,
                               eps1, shard, stacked)
    else:
        u, v = unfactored_update(grad32, g2, state["exp_avg_sq"], pscale, hp, sc, eps1, shard, stacked)
    apply_(param32, state, u, v, step, pscale, lr, hp)
    write_back_(param, param32)
