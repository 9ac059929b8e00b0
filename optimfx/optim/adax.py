"""AdaX and AdaXW: validation, state layout and documentation (maths in ``reference/adax.py``)."""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional

import torch

from .._algorithm import Algorithm
from .._validation import check_betas, check_choice, check_positive
from ..reference import aten_fused
from ..reference import adax as ref
from .base import FxOptimizer
from .gradient_masks import CHILD_TUNING_ARGS, MASK_GROUP_CHECKS, GradientMaskMixin

ADAX = Algorithm(
    name="adax",
    init_state=ref.init_state,
    hyper=ref.AdaXHyper.from_group,
    scalars=ref.host_scalars,
    reference_step=ref.step_,
    group_step=functools.partial(aten_fused.step_group, ref.fused_adam_arguments),
)

_SHARED_ARGS = r"""
    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate :math:`\alpha` (float or 1-element tensor). Default: {lr}.
        betas: ``(b1, b2)``; ``b1`` in [0, 1) is the momentum coefficient, ``b2`` in (0, 1) the
            long-term-memory rate. Default: ``(0.9, 1e-4)`` (paper and official code).
        eps: ε. Default: ``1e-12`` (official code).
        weight_decay: {wd_doc} Default: {wd}.
        eps_mode: where ε enters the denominator: ``"official"`` (on the raw ``sqrt(v_t)``, i.e.
            ``ε/sqrt(c_t)`` on ``sqrt(v̂)``, the code the paper's experiments used), ``"adam"``
            (``sqrt(v̂) + ε``) or ``"inside"`` (``sqrt(v̂ + ε)``, the blog notation). Default: ``"official"``.
        {child_tuning}
        maximize: ascend the objective instead of descending. Default: ``False``.
        skip_nonfinite: skip a group's step when its gradients hold inf/NaN, leaving parameters and
            state untouched, so one bad batch cannot poison the moments. Default: ``True``.
        backend: ``"auto"`` (Triton on CUDA, reference elsewhere), ``"reference"``, ``"triton"`` or
            ``"compiled"``. Default: ``"auto"``.
"""

_EQUATIONS = r"""
    .. math::

        g_t &\leftarrow \nabla_\theta f(\theta_{{t-1}}){l2}\\
        m_t &= b_1 m_{{t-1}} + (1-b_1) g_t \\
        \hat v_t &= \hat v_{{t-1}} + w_t (g_t^2 - \hat v_{{t-1}}),\quad
            w_t = \frac{{b_2}}{{(1+b_2)^t - 1}} \\
        \theta_t &= \theta_{{t-1}}{decay} - \alpha \frac{{m_t}}{{\sqrt{{\hat v_t}} + \epsilon_{{\rm eff}}}}

    with :math:`\epsilon_{{\rm eff}} = \epsilon/\sqrt{{c_t}}` for ``eps_mode="official"`` and
    :math:`\epsilon` otherwise. :math:`\hat v` is the official raw second moment divided by its bias
    correction :math:`c_t = (1+b_2)^t - 1`, updated with the stable weight :math:`w_t`: the same numbers
    as the official recursion, without its fp32 overflow near 0.9 M steps.
"""


#: ``b1`` in [0, 1), ``b2`` in (0, 1)
ADAX_BETAS = ((0.0, 1.0, False, True), (0.0, 1.0, True, True))


class _AdaXBase(GradientMaskMixin, FxOptimizer):
    algorithm = ADAX
    _decoupled: bool
    group_checks = {**MASK_GROUP_CHECKS, "betas": functools.partial(check_betas, ranges=ADAX_BETAS),
                    "eps": functools.partial(check_positive, "eps"),
                    "eps_mode": functools.partial(check_choice, "eps_mode", choices=ref.EPS_MODES)}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor, betas: tuple[float, float],
                 eps: float, weight_decay: float, *, eps_mode: str, child_tuning_mode: Optional[str],
                 reserve_p: float, seed: int, maximize: bool, skip_nonfinite: bool, backend: str,
                 bf16_rounding: str, rounding_seed: int) -> None:
        defaults = dict(
            # checked as a param group's values are (FxOptimizer.__init__, group_checks)
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_mode=eps_mode,
            decoupled=self._decoupled, child_tuning_mode=child_tuning_mode, reserve_p=reserve_p, seed=seed,
            maximize=bool(maximize),
            skip_nonfinite=bool(skip_nonfinite), backend=backend,
            bf16_rounding=bf16_rounding, rounding_seed=rounding_seed,
        )
        super().__init__(params, defaults)


class AdaX(_AdaXBase):
    __doc__ = (
        r"""AdaX with coupled L2 weight decay, as the official ``AdaX`` class.

    AdaX replaces Adam's exponential-moving second moment with an exponentially *growing* long-term
    memory, so the preconditioner settles instead of tracking recent gradients.
"""
        + _EQUATIONS.format(l2=r" + \lambda\theta_{t-1}", decay="")
        + _SHARED_ARGS.format(lr="``1.5e-3``", wd="``5e-4``",
                              wd_doc="coupled L2 coefficient λ: ``g ← g + λθ`` before the moments "
                                     "(``p.grad`` itself is never modified).",
                              child_tuning=CHILD_TUNING_ARGS)
        + r"""
    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.AdaX(model.parameters(), lr=1.5e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Li et al, `AdaX: Adaptive Gradient Descent with Exponential Long Term Memory
        <https://arxiv.org/abs/2004.09740>`_, 2020.
"""
    )
    _decoupled = False

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.5e-3,
                 betas: tuple[float, float] = (0.9, 1e-4), eps: float = 1e-12, weight_decay: float = 5e-4,
                 *, eps_mode: str = "official", child_tuning_mode: Optional[str] = None,
                 reserve_p: float = 1.0, seed: int = 0, maximize: bool = False, skip_nonfinite: bool = True,
                 backend: str = "auto", bf16_rounding: str = "nearest", rounding_seed: int = 0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, eps_mode=eps_mode,
                         child_tuning_mode=child_tuning_mode, reserve_p=reserve_p, seed=seed,
                         maximize=maximize, skip_nonfinite=skip_nonfinite, backend=backend,
                         bf16_rounding=bf16_rounding, rounding_seed=rounding_seed)


class AdaXW(_AdaXBase):
    __doc__ = (
        r"""AdaX with decoupled weight decay (AdaX-W), as the official ``AdaXW`` class.
"""
        + _EQUATIONS.format(l2="", decay=r"(1 - \alpha\lambda)")
        + _SHARED_ARGS.format(lr="``5e-3``", wd="``5e-2``",
                              wd_doc="decoupled decay λ: ``θ ← θ·(1 − lr·λ)`` each step.",
                              child_tuning=CHILD_TUNING_ARGS)
        + r"""
    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.AdaXW(model.parameters(), lr=5e-3, weight_decay=5e-2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Li et al, `AdaX: Adaptive Gradient Descent with Exponential Long Term Memory
        <https://arxiv.org/abs/2004.09740>`_, 2020.
"""
    )
    _decoupled = True

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 5e-3,
                 betas: tuple[float, float] = (0.9, 1e-4), eps: float = 1e-12, weight_decay: float = 5e-2,
                 *, eps_mode: str = "official", child_tuning_mode: Optional[str] = None,
                 reserve_p: float = 1.0, seed: int = 0, maximize: bool = False, skip_nonfinite: bool = True,
                 backend: str = "auto", bf16_rounding: str = "nearest", rounding_seed: int = 0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, eps_mode=eps_mode,
                         child_tuning_mode=child_tuning_mode, reserve_p=reserve_p, seed=seed,
                         maximize=maximize, skip_nonfinite=skip_nonfinite, backend=backend,
                         bf16_rounding=bf16_rounding, rounding_seed=rounding_seed)
