r"""AdaX/AdaXW and AdamW steps through ATen's fused Adam kernel: the reference backend's CPU fast path.

ATen's fused Adam (``torch._fused_adam_`` / ``torch._fused_adamw_``, what ``torch.optim.Adam(fused=True)``
runs) updates ``θ``, ``m`` and ``v`` of a whole list of tensors in one vectorised, multi-threaded pass
per element. The per-tensor reference takes five or six ATen ops per tensor, each a full pass and a
few microseconds of dispatch: on this project's 2-core CPU benchmark the fused kernel stepped AdaX
4.2x faster on the transformer-shaped preset, 2.4x on 1024 tensors of 128², 2.2x on 16 of 1024²
(``benches/results/adam-family-cpu-2026-12-07.md``).

Both algorithms are Adam with other scalars. The kernel computes, for ``t`` its step count,

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    \theta \leftarrow \theta - \frac{lr}{1-\beta_1^t}\, \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

with ``g`` first negated (``maximize``) and, in Adam mode, added ``λθ`` (coupled L2); AdamW mode
decays ``θ ← θ − lr·λ·θ`` first. Each algorithm's ``fused_adam_arguments`` maps its step onto it:

* AdaX (§2.1): ``β2 := 1 − w_t``, ``ε := ε_eff``, coupled L2 in Adam mode, AdaXW's decay in AdamW mode;
* AdamW with bias corrections ``c1`` (on ``m``) and ``c2`` (on ``√v``):
  ``lr·c1·m / (c2·√v + ε) = (lr·c1/c2)·m / (√v + ε/c2)`` and ``λ := λ·lr / (lr·c1/c2)``.

The kernel's own bias correction is switched off by a step count so large that ``β^t`` is 0 in
float64 (:data:`NO_BIAS_CORRECTION`, read by the kernel as ``1 − β^t``; it never writes it), so
every map needs ``β1, β2 < 1``. The result equals the per-tensor reference to rounding (the
kernel associates some products differently; within one ulp of the parameters over 20 steps,
tested in ``tests/reference/test_aten_fused.py``).

Tensors the kernel cannot take go to the per-tensor reference step: anything but fp32 parameters
with fp32 gradients on CPU (the kernel wants one dtype for parameter, gradient and state, and the
state is fp32), non-contiguous tensors (it walks memory linearly), and the options a map declines
(it returns ``None``). ChildTuning masks act on the gradient before the moments, as the reference
applies them (``p.grad`` is never written). A masked group takes the same step in the C kernel of
``optimfx._kernels.cpu_adam``, which computes the mask where it loads the gradient (the F mask's
hash bit for bit the reference's) where that kernel is built; otherwise it is stepped in batches of
about a million elements (``batched_masks.py``), each masked into a reused buffer by ATen ops and
stepped by one kernel call on the matching slices of parameters and moments while the masked
gradients are still in cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import defaultdict
from typing import Any, Callable, Iterator, NamedTuple, Optional, Protocol

import torch

from .._kernels import cpu_adam
from . import batched_masks
from . import child_tuning as ct

Tensor = torch.Tensor

#: the step count passed to the kernel: ``1 − β^(2^100)`` is exactly 1 in float64 for every ``β < 1``
NO_BIAS_CORRECTION = 2.0 ** 100


class FusedAdamArguments(NamedTuple):
    """The scalars of one call of ATen's fused Adam kernel (no bias correction)."""

    decoupled: bool  # AdamW mode (θ ← θ − lr·λ·θ first) rather than Adam's coupled L2
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    eps: float
    maximize: bool


#: ``(hyper, scalars, lr) -> FusedAdamArguments``, or ``None`` when the step does not map exactly
ArgumentsMap = Callable[[Any, Any, float], Optional[FusedAdamArguments]]


class Takeover(Protocol):
    """Takes the unmasked Adam step of some tensors into a pass of its own (``EGStepSize`` around an
    optimfx ``AdamW``/``AdaX`` on CPU: ``optimfx._kernels.cpu_eg.adam_step``)."""

    def __call__(self, params: list[Tensor], states: list[dict], args: FusedAdamArguments) -> set[int]:
        """Step what it takes of ``params`` (their base ``states``, ATen's scalars ``args``); return
        the positions of the tensors it stepped."""


_TAKEOVER: contextvars.ContextVar[Optional[Takeover]] = contextvars.ContextVar("optimfx_adam_takeover",
                                                                                default=None)


@contextlib.contextmanager
def steps_taken_by(takeover: Takeover) -> Iterator[None]:
    """Within it, :func:`step_group` offers every unmasked kernel call to ``takeover`` first and
    steps only the tensors it leaves."""
    token = _TAKEOVER.set(takeover)
    try:
        yield
    finally:
        _TAKEOVER.reset(token)


def arguments_map(algorithm: Any) -> Optional[ArgumentsMap]:
    """The map of an algorithm whose group step is :func:`step_group` (AdamW, AdaX), else ``None``."""
    step = getattr(algorithm, "group_step", None)
    if isinstance(step, functools.partial) and step.func is step_group and len(step.args) == 1:
        return step.args[0]
    return None


def masked(hyper: Any) -> bool:
    """Whether a group's steps mask its gradients (ChildTuning)."""
    mask = getattr(hyper, "mask", ct.NO_MASK)
    return bool(mask.bernoulli or mask.mode == "D")


def available() -> bool:
    """Whether this torch has the fused Adam ops (torch ≥ 2.4 runs them on CPU)."""
    return hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_")


def takes(param: Tensor, grad: Tensor, state: dict) -> bool:
    """Whether the kernels (ATen's, and ``optimfx._kernels.cpu_adam`` for masked steps) can step this
    tensor: parameter, gradient and moments fp32 on CPU, of one size and contiguous (the kernels walk
    the four in the same linear order). Anything else, a state of another size or dtype loaded from a
    checkpoint among them, takes the per-tensor step, which says what is wrong."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if param.device.type != "cpu" or any(t.dtype != torch.float32 for t in tensors):
        return False
    n = param.numel()
    return all(t.is_contiguous() and t.numel() == n and t.device.type == "cpu" for t in tensors)


def step_group(arguments: ArgumentsMap, params: list[Tensor], grads: list[Tensor], states: list[dict],
               steps: list[int], hyper: Any, lr: float, scalars_of: Callable[[int], Any],
               stochastic_bf16: bool = False) -> list[int]:
    """Step every tensor the kernel can take, one kernel call per step count; returns the indices
    left to the per-tensor reference step.

    ``stochastic_bf16`` concerns bf16 parameters only, which the kernel never takes. ``p.grad`` is
    only read.
    """
    del stochastic_bf16
    if not available():
        return list(range(len(params)))
    by_step: dict[int, list[int]] = defaultdict(list)
    alone: list[int] = []
    for i, (p, g, state) in enumerate(zip(params, grads, states)):
        (by_step[steps[i]] if takes(p, g, state) else alone).append(i)
    for step, idx in by_step.items():
        args = arguments(hyper, scalars_of(step), lr)
        if args is None:
            alone.extend(idx)
            continue
        idx = [i for i in idx if params[i].numel()]  # an empty tensor's step changes nothing
        takeover = _TAKEOVER.get()
        if takeover is not None and idx and not masked(hyper):
            taken = takeover([params[i] for i in idx], [states[i] for i in idx], args)
            idx = [i for k, i in enumerate(idx) if k not in taken]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        _step_masked(pick(params), pick(grads), pick(states), args, getattr(hyper, "mask", ct.NO_MASK), step)
    return sorted(alone)


def _step_masked(params: list[Tensor], grads: list[Tensor], states: list[dict], args: FusedAdamArguments,
                 mask: ct.MaskHyper, step: int) -> None:
    """One kernel call for the whole list. With ChildTuning masks: one call of the C kernel
    (:func:`_step_in_cpu_kernel`) where it is built, else one ATen call per batch of segments
    (``batched_masks.py``): each batch's gradients are masked into a reused buffer (the gradients are
    only read), then the kernel steps the matching slices of parameters and moments while the masked
    rows are in cache. Either kernel then negates them for ``maximize`` and adds coupled L2, the
    reference's order. ``step`` is every tensor's step count (the F masks' key)."""
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    if not (mask.bernoulli or mask.mode == "D"):
        _call(params, grads, exp_avgs, exp_avg_sqs, args)
        return
    if _step_in_cpu_kernel(params, grads, exp_avgs, exp_avg_sqs, states, args, mask, step):
        return
    flat = lambda ts: [t.view(-1) for t in ts]  # noqa: E731
    params, grads, exp_avgs, exp_avg_sqs = flat(params), flat(grads), flat(exp_avgs), flat(exp_avg_sqs)
    keys: dict[int, int] = {}
    for batch in batched_masks.batches(batched_masks.segments([p.numel() for p in params])):
        masked = batched_masks.masked_batch(grads, states, mask, batch, keys)
        rows = lambda ts: batched_masks.rows(ts, batch)  # noqa: E731
        _call(rows(params), masked, rows(exp_avgs), rows(exp_avg_sqs), args)


def _step_in_cpu_kernel(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], states: list[dict], args: FusedAdamArguments,
                        mask: ct.MaskHyper, step: int) -> bool:
    """The masked step in one pass per element (``optimfx._kernels.cpu_adam``: the mask computed
    where the gradient is loaded), when that kernel is built and takes every stored mask (the other
    tensors passed :func:`takes`); ``False`` (nothing done) otherwise. ``step`` is every tensor's
    step count."""
    if not cpu_adam.available():
        return False
    if mask.bernoulli:
        kw = dict(mask_mode=cpu_adam.MASK_BERNOULLI, threshold=ct.keep_threshold(mask.reserve_p),
                  keep_scale=ct.keep_scale(mask.reserve_p), offsets=[ct.element_offset(s) for s in states],
                  keys=[ct.mask_key(mask.seed, int(s["mask_stream"]), step) for s in states])
    else:
        masks = [s.get("child_mask") for s in states]
        if not all(m is None or cpu_adam.takes_mask(m, p) for m, p in zip(masks, params)):
            return False
        kw = dict(mask_mode=cpu_adam.MASK_STORED, masks=masks)
    cpu_adam.step(params, grads, exp_avgs, exp_avg_sqs, lr=args.lr, beta1=args.beta1, beta2=args.beta2,
                  weight_decay=args.weight_decay, eps=args.eps, decoupled=args.decoupled,
                  maximize=args.maximize, **kw)
    return True


def _call(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          args: FusedAdamArguments) -> None:
    if not params:
        return
    op = torch._fused_adamw_ if args.decoupled else torch._fused_adam_
    no_correction = torch.tensor(NO_BIAS_CORRECTION)
    op(params, grads, exp_avgs, exp_avg_sqs, [], [no_correction] * len(params), lr=args.lr,
       beta1=args.beta1, beta2=args.beta2, weight_decay=args.weight_decay, eps=args.eps, amsgrad=False,
       maximize=args.maximize)
