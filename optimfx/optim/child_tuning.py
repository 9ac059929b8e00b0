"""``ChildTuning``: ChildTuning gradient masks around any ``torch.optim`` optimizer (the slower adapter).

With optimfx's :class:`~optimfx.AdamW` the mask is fused into the update (``child_tuning_mode=``); this
adapter serves every other optimizer. During the base's ``step()`` each ``p.grad`` is swapped for a
masked copy and the user's gradient object is put back afterwards, so ``p.grad`` is never modified.
The masks are the reference's (:func:`optimfx.reference.child_tuning.mask_grad`); on FSDP2 (DTensor)
parameters they are computed on each rank's local shard, F masks keyed by global element indices
and D masks sliced like the parameter, so a sharded run masks as a single-process one does.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import Any, Callable, Mapping, Optional

import torch
from torch.optim import Optimizer

from .. import _distributed
from .._precision import real_view, working_copy
from .._validation import apply_checks
from ..reference import child_tuning as ct
from ._wrapped_state import (add_param_group_via_base, fill_own_defaults, load_with_base_state,
                             refuse_closure_steps, restore_own_defaults, share_base_groups, state_dict_with_base,
                             unchanged_if_refused)
from .gradient_masks import (MASK_GROUP_CHECKS, GradientMaskMixin, pending_for_copy, pending_from_copy, save_pending,
                             stored_masks, take_back_pending, warn_if_no_d_mask)
from .mask_streams import fix_streams

Tensor = torch.Tensor
#: the adapter's own per-parameter state (the base's is stored beside it as ``"base/<key>"``)
STATE_KEYS = ("step", "child_mask", "mask_stream")


def _checked_mode(mode: Any) -> str:
    """``"F"`` or ``"D"`` from either spelling."""
    normalised = ct.normalise_mode(mode)
    if normalised not in ("F", "D"):
        raise ValueError(f"Invalid mode: {mode!r} (must be 'F', 'D', 'ChildTuning-F' or 'ChildTuning-D')")
    return normalised


def _checked_group_mode(mode: Any) -> Optional[str]:
    """A param group's mode: as the adapter's, or ``None`` for a group it leaves unmasked."""
    return None if mode is None else _checked_mode(mode)


def _inner_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer at the bottom of a chain of wrappers (``EGStepSize(ChildTuning(AdaX))`` → AdaX)."""
    while isinstance(getattr(optimizer, "base", None), Optimizer):
        optimizer = optimizer.base
    return optimizer


class ChildTuning(Optimizer):
    r"""Apply ChildTuning-F or -D gradient masks before any optimizer's step.

    .. math::

        \tilde g_t = g_t \odot M_t / p_F \ \text{(F: fresh Bernoulli mask each step)}, \qquad
        \tilde g_t = g_t \odot M \ \text{(D: fixed Fisher mask)}

    Around an optimfx optimizer that masks gradients itself (:class:`~optimfx.AdamW`,
    :class:`~optimfx.AdaX`, :class:`~optimfx.AdaXW`, :class:`~optimfx.AdaFactor`), the adapter sets
    that optimizer's ``child_tuning_mode``, ``reserve_p`` and ``seed`` and hands it the D masks: the
    masks are the same, applied inside its fused update without a gradient copy.

    Args:
        base: the optimizer to feed masked gradients (param groups and schedulers are shared).
        mode: ``"F"``/``"ChildTuning-F"`` or ``"D"``/``"ChildTuning-D"``.
        reserve_p: keep probability of F-mode masks, in (0, 1]. Default: ``1.0``.
        seed: key of the mask stream: same seed, same masks (also across DDP ranks and FSDP2
            shards). Default: ``0``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.ChildTuning(torch.optim.SGD(model.parameters(), lr=0.1), mode="F", reserve_p=0.3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Xu et al, `Raise a Child in Large Language Model: Towards Effective and Generalizable
        Fine-tuning <https://arxiv.org/abs/2109.05687>`_, 2021.
    """

    #: checks of the ChildTuning options a param group may set for itself
    group_checks = {
        "child_tuning_mode": _checked_group_mode,
        "reserve_p": MASK_GROUP_CHECKS["reserve_p"],
        "seed": MASK_GROUP_CHECKS["seed"],
    }

    def __init__(self, base: Optimizer, mode: str, reserve_p: float = 1.0, seed: int = 0) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"ChildTuning wraps a torch.optim.Optimizer, got {type(base).__name__}")
        refuse_closure_steps(base, "ChildTuning")
        self.base = base
        # a group may leave itself unmasked (None); the adapter's own mode must mask
        defaults = apply_checks(dict(child_tuning_mode=_checked_mode(mode), reserve_p=reserve_p, seed=seed),
                                self.group_checks)
        # an optimfx optimizer with masks of its own takes the adapter's settings (its groups hold the
        # same keys, with its own defaults: they are overwritten, not filled in)
        self._delegates = isinstance(base, GradientMaskMixin)
        inner = _inner_optimizer(base)
        if not self._delegates and isinstance(inner, GradientMaskMixin):
            # a wrapper around an optimfx optimizer (EGStepSize(AdaX(...))): the shared groups' mask
            # options are that optimizer's, and setting them would mask inside it as well
            raise ValueError(f"ChildTuning: this {type(base).__name__} wraps {type(inner).__name__}, whose "
                             "ChildTuning options its param groups hold; wrap that optimizer instead "
                             "(e.g. EGStepSize(ChildTuning(AdaX(...), ...))) or pass child_tuning_mode= to it")
        if self._delegates:
            masked = [g["child_tuning_mode"] for g in base.param_groups if g.get("child_tuning_mode") is not None]
            if masked:
                raise ValueError(f"ChildTuning: the {type(base).__name__} already masks its gradients "
                                 f"(child_tuning_mode={masked[0]!r}); masking them twice would drop and "
                                 "rescale twice")
            for group in base.param_groups:
                group.update(defaults)
        super().__init__(base.param_groups, defaults)
        share_base_groups(self, defaults)

    def _adopt_earlier_layout(self) -> None:
        """A checkpoint of this adapter around an optimfx optimizer written before the adapter handed
        it the masks: its D masks are in the adapter's state and its groups say "no mask" (the base's
        default, which that adapter left in place, masking nothing). The masks move to the base and
        the adapter's options apply again, with a warning."""
        masks = {p: state.pop("child_mask") for p, state in self.state.items() if "child_mask" in state}
        if masks:
            self.base.set_gradient_mask(masks)  # type: ignore[attr-defined]
        if all(group.get("child_tuning_mode") is None for group in self.param_groups):
            for group in self.param_groups:
                group.update({k: self.defaults[k] for k in ("child_tuning_mode", "reserve_p", "seed")})
            warnings.warn("ChildTuning: this checkpoint's param groups apply no mask (written by an earlier "
                          "version, whose adapter left an optimfx optimizer's masks off); the adapter's "
                          f"mode {self.defaults['child_tuning_mode']!r} applies from now on.", UserWarning,
                          stacklevel=3)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and groups; a copy needs its base too
        return {**super().__getstate__(), "base": self.base, "own_defaults": self.own_defaults,
                "_delegates": self._delegates,
                "_pending_by_position": pending_for_copy(self, self._pending_masks)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        by_position = state.pop("_pending_by_position", {})
        super().__setstate__(state)
        restore_own_defaults(self)
        self.__dict__["_pending_gradient_masks"] = pending_from_copy(self, by_position)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer (its defaults and checks) and to this wrapper,
        which shares it; keys the group leaves out take both optimizers' defaults."""
        add_param_group_via_base(self, param_group, super().add_param_group)

    def set_gradient_mask(self, gradient_mask: Mapping[Tensor, Tensor]) -> None:
        """D-mode masks ``{parameter: mask}``, stored as uint8 in the state (checkpointed); the base's
        state when it masks gradients itself."""
        if self._delegates:
            self.base.set_gradient_mask(gradient_mask)  # type: ignore[attr-defined]
            return
        for p, stored in stored_masks(self, gradient_mask):
            if "step" in self.state.get(p, ()):
                self.state[p]["child_mask"] = stored
            else:
                # before the tensor's first step the state stays empty, as a fresh optimizer's: the
                # mask waits (and is saved) apart, and joins the state at that step
                self._pending_masks[id(p)] = (p, stored)

    @property
    def _pending_masks(self) -> dict[int, tuple[Tensor, Tensor]]:
        return self.__dict__.setdefault("_pending_gradient_masks", {})

    def _masked(self, entries: list[tuple[int, Tensor, dict]]) -> list[Tensor]:
        """The masked gradient of every ``(position, parameter, group)``, after advancing its step:
        a new tensor, or ``p.grad`` itself when no mask applies."""
        params = [p for _, p, _ in entries]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        self._advance_steps(params, states)
        if any(ct.MaskHyper.from_group(group).mode == "D" for _, _, group in entries):
            warn_if_no_d_mask(self, self._pending_masks)
        self._fix_streams([p for (_, p, group), state in zip(entries, states)
                           if ct.MaskHyper.from_group(group).bernoulli and "mask_stream" not in state])
        # FSDP2: local shards, and state views with the local D mask and the shard's ShardSpec
        local = _distributed.local_group(params, grads, states, {})
        local_grads, views = (grads, states) if local is None else local[1:]
        return [self._mask_one(p, grad, g, view, ct.MaskHyper.from_group(group), index)
                for (index, p, group), grad, g, view in zip(entries, grads, local_grads, views)]

    def _advance_steps(self, params: list[Tensor], states: list[dict[str, Any]]) -> None:
        """Each tensor's step count + 1; a D mask waiting for its tensor's first step joins the state."""
        pending = self._pending_masks
        for p, state in zip(params, states):
            step = state.get("step")
            # a new tensor, never an increment in place: a loaded counter may be the saved one itself
            state["step"] = torch.ones((), dtype=torch.int64) if step is None else step + 1
            if id(p) in pending:
                state["child_mask"] = pending.pop(id(p))[1]

    def _fix_streams(self, fresh: list[Tensor]) -> None:
        """F-mask stream numbers of the tensors masked for the first time: fixed then, and
        checkpointed, as the fused optimizers do (:mod:`~optimfx.optim.mask_streams`)."""
        if fresh:
            everything = list(chain.from_iterable(g["params"] for g in self.param_groups))
            fix_streams(everything, [self.state.get(p) for p in everything], fresh)

    def _mask_one(self, p: Tensor, grad: Tensor, local_grad: Tensor, view: dict[str, Any], hp: ct.MaskHyper,
                  index: int) -> Tensor:
        """``grad`` masked (``local_grad``: its local shard under FSDP2, with the state ``view``), in
        ``grad``'s dtype and kind (complex, DTensor); ``grad`` itself when no mask applies.

        A complex gradient is masked as its ``(..., 2)`` real view, as the fused optimizers do: real
        and imaginary parts draw their own F bits and share the element's D bit.
        """
        g32 = working_copy(real_view(local_grad))
        if local_grad.is_complex() and "child_mask" in view and view["child_mask"].dim() < g32.dim():
            # a mask stored with the complex shape (set_gradient_mask stores the real view's)
            view = {**view, "child_mask": view["child_mask"].unsqueeze(-1).expand(g32.shape)}
        masked = ct.mask_grad(g32, {**view, "mask_stream": self.state[p].get("mask_stream", index)}, hp)
        if masked is g32:
            return grad
        masked = masked.to(real_view(local_grad).dtype)
        if local_grad.is_complex():
            masked = torch.view_as_complex(masked)
        if _distributed.is_dtensor(grad):
            from torch.distributed.tensor import DTensor

            masked = DTensor.from_local(masked, p.device_mesh, p.placements, run_check=False,
                                        shape=grad.shape, stride=grad.stride())
        return masked

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Mask the gradients, run the base step, restore the user's gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._delegates:
            self.base.step()
            self._mirror_steps()
        else:
            fill_own_defaults(self)  # a group added to the base directly is masked too
            self._masked_base_step()
        return loss

    def _mirror_steps(self) -> None:
        """Around an optimfx optimizer the state is the base's; each parameter's entry here holds the
        base's step counter (the tensor itself, never a copy), so the adapter's state is not empty once
        the base has state. ``torch.distributed.checkpoint`` takes an optimizer with empty state for a
        fresh one and creates its state by stepping it with zero gradients and ``lr = 0``, which would
        advance the base's counters and decay its moments."""
        for p, base_state in self.base.state.items():
            step = base_state.get("step")
            if isinstance(step, Tensor):
                self.state[p]["step"] = step

    @torch.compiler.disable
    def _masked_base_step(self) -> None:
        """Inside a ``torch.compile``d training step this runs as one eager region, as optimfx's
        optimizers do: the integer mask hash and the step counts never reach a graph."""
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        groups = chain.from_iterable([g] * len(g["params"]) for g in self.param_groups)
        entries = [(index, p, group) for index, (p, group) in enumerate(zip(params, groups)) if p.grad is not None]
        if any(p.grad.is_sparse for _, p, _ in entries):
            raise RuntimeError("ChildTuning does not support sparse gradients")
        originals: list[tuple[Tensor, Tensor]] = []
        try:
            for (_, p, _), masked in zip(entries, self._masked(entries)):
                originals.append((p, p.grad))
                p.grad = masked
            self.base.step()
        finally:
            for p, grad in originals:
                p.grad = grad

    def state_dict(self) -> dict[str, Any]:
        """The adapter's state (``step``, ``child_mask``, ``mask_stream``) in the standard layout; each
        parameter's entry also holds the base's state for it, as ``"base/<key>"``
        (:mod:`optimfx.optim._wrapped_state`: the layout ``torch.distributed.checkpoint`` saves whole)."""
        saved = state_dict_with_base(self)
        save_pending(self, saved, self._pending_masks)
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the adapter's and the base's state (also a checkpoint holding the base's under ``"base"``)."""
        with unchanged_if_refused(self):
            saved = load_with_base_state(self, state_dict, STATE_KEYS, "ChildTuning")
        self._pending_masks.clear()
        if self._delegates:
            self._adopt_earlier_layout()
            self._mirror_steps()
        for state in self.state.values():  # torch casts every state tensor to the param dtype on load
            if "child_mask" in state:
                state["child_mask"] = (state["child_mask"] != 0).to(torch.uint8).contiguous()
        take_back_pending(self.state, self._pending_masks)
        # stream numbers from the saved integers: the cast above passes them through a bf16/fp16
        # parameter's dtype, which holds whole numbers exactly only up to 256/2048
        saved_ids = chain.from_iterable(g["params"] for g in saved["param_groups"])
        for saved_id, p in zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)):
            stream = saved["state"].get(saved_id, {}).get("mask_stream")
            if stream is not None:
                self.state[p]["mask_stream"] = torch.tensor(int(stream), dtype=torch.int64)
