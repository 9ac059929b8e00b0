r"""AdaFactor's CPU fast path: the C kernel of ``optimfx._kernels.cpu_adafactor``.

The reference step (``adafactor.py``) takes about ten ATen passes per tensor, and a model's many
small tensors cost more in per-op overhead than in arithmetic (which ``stacking.py`` works around by
stacking them). The C kernel steps every fp32 tensor of a group in two passes over a matrix's
gradient (three for a vector's), the same update (``reference/adafactor.py``'s docstring) to
rounding:

1. ``Σθ²``, each row's new statistic, the column sums of ``G²`` and of ``G²/R_i`` per block of rows
   (from which the clip's ``ΣU² = Σ_i a_i² Σ_j G²_ij b_j²`` follows), and the group's inf/NaN check;
2. (vectors, and a matrix where some ``R̄/R_i`` reaches the cap) the second moment and ``ΣU²``;
3. ``θ ← θ·(1 − λ·…) − α_t·Û`` (or through the momentum ``M``),

with the factored statistics' update and the clip computed per tensor in between, and the
ChildTuning mask applied where the gradient is loaded (bit for bit the reference's masks).

It takes the paper's ε form (``eps_mode="paper"``, ``ε1`` at least the smallest normal fp32 number,
1e-30 by default) and tensors :func:`optimfx._kernels.cpu_adafactor.takes` accepts (contiguous fp32
or bf16 parameters and gradients on CPU, not FSDP2 shards; bf16 parameters written with stochastic
rounding take the reference). The rest of a group takes the stacked reference
step, where the kernel is not built the whole group does.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from .. import _distributed
from .._dispatch import all_finite
from .._kernels import cpu_adafactor
from . import adafactor as ref
from . import child_tuning as ct
from .stacking import step_stacks

Tensor = torch.Tensor
_TINY = torch.finfo(torch.float32).tiny


def supported(hp: ref.AdaFactorHyper) -> bool:
    """Whether the kernel computes this group's options (the paper's ε form with a normal ``ε1``)."""
    return hp.eps_mode == "paper" and hp.eps1 is not None and hp.eps1 >= _TINY


def _taken(param: Tensor, grad: Tensor, state: dict, momentum: bool) -> bool:
    return _distributed.SHARD_KEY not in state and cpu_adafactor.takes(param, grad, state, momentum)


def _options(hp: ref.AdaFactorHyper, sc: ref.AdaFactorScalars, lr: float) -> cpu_adafactor.Options:
    return cpu_adafactor.Options(
        weight=sc.weight, eps1=hp.eps1, eps2=hp.eps2, clip_threshold=hp.clip_threshold,
        step=float(ref.step_size(lr, sc, hp)), lr=float(lr), weight_decay=hp.weight_decay, beta1=hp.beta1,
        scale_parameter=hp.scale_parameter, decay_torch=hp.decay_mode == "torch", maximize=hp.maximize)


def _mask_arguments(mask: ct.MaskHyper, states: list[dict], step: int) -> dict[str, Any]:
    if mask.bernoulli:
        # the kernel forms each tensor's key (ct.mask_key) from its stream: in Python that is a call
        # of about 2 µs per tensor, milliseconds on a model of a thousand small tensors
        return {"f_mask": cpu_adafactor.FMask(
            ct.seed_words(mask.seed)[0], ct.step_word(mask.seed, step), ct.step_word(mask.seed, step + 1),
            torch.stack([s["mask_stream"] for s in states]), ct.keep_threshold(mask.reserve_p),
            ct.keep_scale(mask.reserve_p))}
    return {"stored_masks": mask.mode == "D"}


def step_group(stacked_step: Callable[..., None], params: list[Tensor], grads: list[Tensor], states: list[dict],
               steps: list[int], hyper: ref.AdaFactorHyper, lr: float, scalars_of: Callable[[int], Any],
               stochastic_bf16: bool = False, check_finite: bool = False) -> Optional[list[int]]:
    """Step the group's tensors the kernel takes (one kernel step per step count), the others on
    stacks (``stacking.step_stacks`` with ``stacked_step``); returns the indices left to the
    per-tensor reference step.

    ``check_finite``: first make sure that no gradient of the group holds inf/NaN, the kernel's
    first pass checking its own tensors; return ``None``, having written nothing, when one does.
    """
    taken: dict[int, list[int]] = defaultdict(list)
    rest: list[int] = []
    usable, momentum = supported(hyper) and cpu_adafactor.available(), hyper.beta1 is not None
    for i, (p, g, state) in enumerate(zip(params, grads, states)):
        # stochastic rounding of bf16 parameters is keyed per tensor: the reference's
        kernel = usable and not (stochastic_bf16 and p.dtype is torch.bfloat16) and _taken(p, g, state, momentum)
        (taken[steps[i]] if kernel else rest).append(i)
    # the kernel's check covers one call: with several step counts every gradient is checked first
    check_in_kernel = check_finite and len(taken) == 1
    if check_finite:
        unchecked = rest if check_in_kernel else range(len(params))
        if not all_finite([grads[i] for i in unchecked]):
            return None
    for step, idx in taken.items():
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        picked_states = pick(states)
        stepped = cpu_adafactor.step(pick(params), pick(grads), picked_states,
                                     _options(hyper, scalars_of(step), lr), check_finite=check_in_kernel,
                                     **_mask_arguments(hyper.mask, picked_states, step))
        if not stepped:
            return None
    if not rest:
        return []
    pick = lambda xs: [xs[i] for i in rest]  # noqa: E731
    left = step_stacks(stacked_step, pick(params), pick(grads), pick(states), pick(steps), hyper, lr, scalars_of,
                       stochastic_bf16)
    return [rest[i] for i in left]

