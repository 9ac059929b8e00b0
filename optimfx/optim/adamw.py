"""AdamW (the fused base for ChildTuning) and ChildTuningAdamW: validation, state layout, docs."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterable, Optional

import torch

from .._algorithm import Algorithm
from .._validation import check_betas, check_choice, check_nonnegative, check_torch_flags
from ..reference import adamw as ref
from ..reference import aten_fused
from ..reference import child_tuning as ct
from .base import FxOptimizer
from .gradient_masks import MASK_GROUP_CHECKS, GradientMaskMixin, documented

ADAMW = Algorithm(
    name="adamw",
    init_state=ref.init_state,
    hyper=ref.AdamWHyper.from_group,
    scalars=ref.host_scalars,
    reference_step=ref.step_,
    group_step=functools.partial(aten_fused.step_group, ref.fused_adam_arguments),
)


#: ``β1`` and ``β2`` in [0, 1)
ADAMW_BETAS = ((0.0, 1.0, False, True), (0.0, 1.0, False, True))


@documented
class AdamW(GradientMaskMixin, FxOptimizer):
    r"""AdamW with optional ChildTuning gradient masks fused into the update.

    .. math::

        \tilde g_t &= g_t \odot M_t / p \ \text{(F)},\quad g_t \odot M \ \text{(D)},\quad g_t \ \text{(off)}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g_t^2\\
        \theta_t &= \theta_{t-1}(1 - \mathrm{lr}\,\lambda) - \mathrm{lr}\,
            \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (float or 1-element tensor). Default: ``1e-3``.
        betas: ``(β1, β2)``. Default: ``(0.9, 0.999)``.
        eps: ε. Default: ``1e-8``.
        weight_decay: decoupled decay λ. Default: ``1e-2``.
        correct_bias: bias-correct the moments. Default: ``True``.
        eps_placement: ``"v_hat"`` (ε on ``sqrt(v̂)``, ``torch.optim.AdamW``) or ``"v"`` (ε on
            ``sqrt(v)``, the legacy transformers AdamW). Default: ``"v_hat"``.
        decay_order: ``"torch"`` (decay, then step) or ``"alicemind"`` (step, then decay the updated
            parameter, as ChildTuning's official code). Default: ``"torch"``.
        {child_tuning}
        amsgrad, foreach, capturable, differentiable, fused: ``torch.optim.AdamW``'s flags, accepted so
            that its calls run unchanged: ``foreach`` and ``fused`` are ignored (optimfx picks its fused
            path, see ``backend``); ``amsgrad``, ``capturable`` and ``differentiable`` must be ``False``.
        maximize, skip_nonfinite, backend: as for every optimfx optimizer.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.AdamW(model.parameters(), lr=1e-3, child_tuning_mode="F", reserve_p=0.3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Loshchilov & Hutter, `Decoupled Weight Decay Regularization
        <https://arxiv.org/abs/1711.05101>`_, 2019. Xu et al, `Raise a Child in Large Language Model:
        Towards Effective and Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, 2021.
    """

    algorithm = ADAMW
    #: ``torch.optim.Adam``/``AdamW`` checkpoints hold the same moments: they load (Adam's with its
    #: L2 weight decay refused, see :meth:`_check_loaded_values`)
    accepted_checkpoint_keys = frozenset({"amsgrad", "decoupled_weight_decay"})
    group_checks = {**MASK_GROUP_CHECKS, "betas": functools.partial(check_betas, ranges=ADAMW_BETAS),
                    "eps": functools.partial(check_nonnegative, "eps"),
                    "eps_placement": functools.partial(check_choice, "eps_placement", choices=ref.EPS_PLACEMENTS),
                    "decay_order": functools.partial(check_choice, "decay_order", choices=ref.DECAY_ORDERS)}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, correct_bias: bool = True, eps_placement: str = "v_hat",
                 decay_order: str = "torch", child_tuning_mode: Optional[str] = None, reserve_p: float = 1.0,
                 seed: int = 0, maximize: bool = False, skip_nonfinite: bool = True, backend: str = "auto",
                 bf16_rounding: str = "nearest", rounding_seed: int = 0, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False, fused: Optional[bool] = None) -> None:
        check_torch_flags(amsgrad=amsgrad, foreach=foreach, capturable=capturable, differentiable=differentiable,
                          fused=fused)
        defaults = dict(
            # checked as a param group's values are (FxOptimizer.__init__, group_checks)
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=bool(correct_bias),
            eps_placement=eps_placement, decay_order=decay_order,
            child_tuning_mode=child_tuning_mode, reserve_p=reserve_p, seed=seed,
            maximize=bool(maximize), skip_nonfinite=bool(skip_nonfinite), backend=backend,
            bf16_rounding=bf16_rounding, rounding_seed=rounding_seed,
        )
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            # torch.optim.Adam's flag, from its checkpoint: this optimizer decays decoupled whatever it
            # says (Adam's L2 decay was refused), and a later weight_decay must not read as Adam's
            group.pop("decoupled_weight_decay", None)

    def _check_loaded_values(self) -> None:
        super()._check_loaded_values()
        for i, group in enumerate(self.param_groups):
            if group.get("decoupled_weight_decay") is False and group["weight_decay"] != 0:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: param group {i} of the checkpoint is torch.optim.Adam's "
                    f"with L2 weight decay (weight_decay={group['weight_decay']}, added to the gradient); "
                    f"{type(self).__name__} decays decoupled, a different update: set the group's weight_decay "
                    "to 0 in the checkpoint, or keep torch.optim.Adam")


class ChildTuningAdamW(AdamW):
    r"""Drop-in for the official ``ChildTuningAdamW`` (same arguments and defaults).

    .. math::

        \tilde g_t &= g_t \odot M_t / p \ \text{(F)},\quad g_t \odot M \ \text{(D)}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g_t^2\\
        \theta_t &= \theta'_{t} - \mathrm{lr}\,\lambda\,\theta'_{t},\qquad
            \theta'_t = \theta_{t-1} - \mathrm{lr}\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} + \epsilon}

    The official optimizer is the legacy transformers AdamW (ε on ``sqrt(v)``, weight decay after the
    step) with a gradient mask; this class is :class:`AdamW` with those options, plus
    ``decay_order`` and ``eps_placement`` to switch to the ``torch.optim.AdamW`` conventions. Unlike
    the official code it never multiplies ``p.grad`` in place.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: Default: ``1e-3``.
        betas: Default: ``(0.9, 0.999)``.
        eps: Default: ``1e-6``.
        weight_decay: Default: ``0.0``.
        correct_bias: Default: ``True``.
        reserve_p: keep probability of F-mode masks. Default: ``1.0`` (no masking).
        mode: ``None``, ``"ChildTuning-F"`` or ``"ChildTuning-D"``. Default: ``None``.
        **kwargs: any other :class:`AdamW` keyword (``seed``, ``decay_order``, ``eps_placement``,
            ``backend``, ...).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.ChildTuningAdamW(model.parameters(), lr=2e-5, reserve_p=0.3, mode="ChildTuning-F")
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Xu et al, `Raise a Child in Large Language Model: Towards Effective and Generalizable
        Fine-tuning <https://arxiv.org/abs/2109.05687>`_, 2021.
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, reserve_p: float = 1.0, mode: Optional[str] = None,
                 **kwargs: Any) -> None:
        if ct.normalise_mode(mode) not in ct.MODES:
            raise ValueError(f"Invalid mode: {mode!r} (must be None, 'ChildTuning-F', 'ChildTuning-D', 'F' or 'D')")
        unknown = sorted(set(kwargs) - _ADAMW_KEYWORDS)
        if unknown:
            # named here: AdamW's own TypeError would name AdamW.__init__
            raise TypeError(f"ChildTuningAdamW.__init__() got an unexpected keyword argument {unknown[0]!r}")
        kwargs.setdefault("eps_placement", "v")
        kwargs.setdefault("decay_order", "alicemind")
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias=correct_bias,
                         child_tuning_mode=mode, reserve_p=reserve_p, **kwargs)


#: the keywords ``ChildTuningAdamW`` passes on to :class:`AdamW`
_ADAMW_KEYWORDS = set(inspect.signature(AdamW.__init__).parameters) - {"self", "params", "child_tuning_mode"}
