"""ChildTuning gradient masks as an option of every optimfx optimizer: validation, mask storage, streams.

The masks themselves are applied where each algorithm loads its gradient (the reference's
``prepare_grad`` and the kernels' ``load_grad``, see ``reference/child_tuning.py``); this module holds
what the optimizer classes share: the ``child_tuning_mode``/``reserve_p``/``seed`` group options,
:meth:`GradientMaskMixin.set_gradient_mask` for ChildTuning-D, and the per-tensor F-mode stream ids.
"""

from __future__ import annotations

import numbers
import warnings
from itertools import chain
from typing import Any, Callable, Mapping, Optional

import torch

from .._validation import check_range
from ..reference import child_tuning as ct
from .mask_streams import fix_streams

Tensor = torch.Tensor

#: the ``Args`` entries of the ChildTuning options, for the optimizers' docstrings
CHILD_TUNING_ARGS = r"""child_tuning_mode: ``None``, ``"F"`` (a fresh Bernoulli(``reserve_p``) gradient mask
            each step, kept entries rescaled by the inverse of the keep probability: ``1/reserve_p``
            with ``reserve_p`` rounded to a multiple of ``2^-16``) or ``"D"`` (fixed masks from
            :meth:`set_gradient_mask`, no rescale); the official names ``"ChildTuning-F"`` and
            ``"ChildTuning-D"`` are accepted. The mask multiplies the gradient before anything else
            sees it (``p.grad`` itself is never modified). Default: ``None``.
        reserve_p: keep probability of F-mode masks, in (0, 1]; ``1`` is the optimizer without
            masks, bit for bit. Default: ``1.0``.
        seed: key of the F-mode masks, a counter-based hash of ``(seed, step, parameter position,
            element)``: the same seed gives the same masks on every backend and data-parallel rank
            and after a resume. Default: ``0``.
        bf16_rounding: how bfloat16 parameters are written after the fp32 update: ``"nearest"`` (to
            nearest even) or ``"stochastic"`` (unbiased, from a counter-based hash of
            ``(rounding_seed, step, element)``, so small updates are not lost). Default: ``"nearest"``.
        rounding_seed: key of the stochastic rounding. Default: ``0``."""


def documented(cls: type) -> type:
    """Class decorator: put :data:`CHILD_TUNING_ARGS` where the docstring says ``{child_tuning}``."""
    cls.__doc__ = cls.__doc__.replace("{child_tuning}", CHILD_TUNING_ARGS)
    return cls


def _checked_mode(mode: Any) -> Optional[str]:
    """``None``, ``"F"`` or ``"D"``, from any spelling the constructors accept."""
    normalised = ct.normalise_mode(mode)
    if normalised not in ct.MODES:
        raise ValueError(f"Invalid child_tuning_mode: {mode!r} (must be None, 'F', 'D', "
                         "'ChildTuning-F' or 'ChildTuning-D')")
    return normalised


def checked_int(name: str, value: Any) -> int:
    """An integer option (Python or numpy; not a bool), as an ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} (must be an int)")
    return int(value)


#: checks of the ChildTuning options and the rounding seed, for a constructor's defaults and for the
#: values a param group sets (``FxOptimizer`` runs them on both; the constructor's spellings are
#: normalised: ``"ChildTuning-F"`` is stored as ``"F"``)
MASK_GROUP_CHECKS: dict[str, Callable[[Any], Any]] = {
    "child_tuning_mode": _checked_mode,
    "reserve_p": lambda p: check_range("reserve_p", p, 0.0, 1.0, low_open=True),
    "seed": lambda seed: checked_int("seed", seed),
    "rounding_seed": lambda seed: checked_int("rounding_seed", seed),
}


def stored_masks(optimizer: Any, gradient_mask: Mapping[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``[(parameter, mask)]`` of a :meth:`~GradientMaskMixin.set_gradient_mask` call, checked (each a
    parameter of ``optimizer``, shaped like it) and in the stored form: ``uint8`` 0/1 on the
    parameter's device, contiguous, expanded over the real view of a complex parameter."""
    known = {id(p) for p in chain.from_iterable(g["params"] for g in optimizer.param_groups)}
    out = []
    for p, mask in gradient_mask.items():
        if id(p) not in known:
            raise ValueError("set_gradient_mask: a masked tensor is not a parameter of this optimizer")
        if mask.shape != p.shape:
            raise ValueError(f"set_gradient_mask: mask shape {tuple(mask.shape)} does not match "
                             f"parameter shape {tuple(p.shape)}")
        stored = (mask != 0).to(device=p.device, dtype=torch.uint8)
        if p.is_complex():
            stored = stored.unsqueeze(-1).expand(*p.shape, 2)
        out.append((p, stored.contiguous()))
    return out


def warn_if_no_d_mask(optimizer: Any, pending: dict[int, tuple[Tensor, Tensor]]) -> None:
    """Warn once when a ChildTuning-D step finds no mask anywhere in ``optimizer`` (state or
    ``pending``): every parameter then trains fully, as plain fine-tuning, which is seldom meant."""
    if optimizer.__dict__.get("_warned_no_d_mask") or pending:
        return
    if any("child_mask" in state for state in optimizer.state.values()):
        return
    optimizer.__dict__["_warned_no_d_mask"] = True
    warnings.warn(f"{type(optimizer).__name__}: ChildTuning-D is on but no gradient mask is set, so every "
                  "parameter trains fully; set the masks first: "
                  "set_gradient_mask(optimfx.build_fisher_mask(model, data, loss_fn, reserve_p))",
                  RuntimeWarning, stacklevel=4)


def save_pending(optimizer: Any, saved: dict[str, Any], pending: dict[int, tuple[Tensor, Tensor]]) -> None:
    """Add the D masks set before a tensor's first step to a state dict, in entries without a step."""
    if pending:
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in optimizer.param_groups))}
        for key, (p, mask) in pending.items():
            if key in index:
                saved["state"].setdefault(index[key], {})["child_mask"] = mask


def pending_for_copy(optimizer: Any, pending: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
    """``{position: mask}`` of the pending D masks, for ``__getstate__`` (a copy's parameters are other
    objects: positions, not ids, find them again)."""
    index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in optimizer.param_groups))}
    return {index[key]: mask for key, (p, mask) in pending.items() if key in index}


def pending_from_copy(optimizer: Any, by_position: dict[int, Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
    """The pending D masks of a copy, from :func:`pending_for_copy` (``__setstate__``)."""
    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    return {id(params[i]): (params[i], mask) for i, mask in by_position.items() if i < len(params)}


def take_back_pending(state: dict[Tensor, dict[str, Any]], pending: dict[int, tuple[Tensor, Tensor]]) -> None:
    """After a load: a loaded mask without a step was set before its tensor's first step, and is
    pending again (an optimizer's state stays empty until it steps, as ``torch.distributed.checkpoint``
    expects of a fresh one)."""
    for p, entry in list(state.items()):
        mask = entry.get("child_mask")
        if isinstance(mask, Tensor) and "step" not in entry:
            pending[id(p)] = (p, mask)
            del state[p]


class GradientMaskMixin:
    """ChildTuning masks for an :class:`~optimfx.optim.base.FxOptimizer` (listed before it in the bases).

    State it adds: ``mask_stream`` (int64 CPU scalar: the number :func:`~optimfx.set_mask_streams` gave
    the parameter, else its position in the optimizer; :mod:`~optimfx.optim.mask_streams`) once F
    mode masks the tensor, and ``child_mask`` (uint8, shaped like the parameter's real view) for
    ChildTuning-D.
    """

    param_groups: list[dict[str, Any]]
    state: dict[Tensor, dict[str, Any]]

    @property
    def _pending_masks(self) -> dict[int, tuple[Tensor, Tensor]]:
        # D masks set before the parameter's state exists (state is created lazily, on its first step)
        return self.__dict__.setdefault("_pending_gradient_masks", {})

    def set_gradient_mask(self, gradient_mask: Mapping[Tensor, Tensor]) -> None:
        """Set ChildTuning-D masks: ``{parameter: mask}``; parameters without a mask train fully.

        Masks are stored as ``uint8`` in the parameter's state (so checkpoints carry them); they are
        multiplied into the gradient where it is loaded, never into ``p.grad``. A complex
        parameter's real and imaginary parts share its mask.
        """
        for p, stored in stored_masks(self, gradient_mask):
            state = self.state.get(p)
            if state:
                state["child_mask"] = stored
            else:
                self._pending_masks[id(p)] = (p, stored)

    def __getstate__(self) -> dict[str, Any]:
        # D masks set before their tensor's first step belong to a copy too
        return {**super().__getstate__(), "_pending_by_position": pending_for_copy(self, self._pending_masks)}  # type: ignore[misc]

    def __setstate__(self, state: dict[str, Any]) -> None:
        by_position = state.pop("_pending_by_position", {})
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__["_pending_gradient_masks"] = pending_from_copy(self, by_position)

    def _init_group(self, group, params, grads, states, hyper):  # noqa: D102
        super()._init_group(group, params, grads, states, hyper)  # type: ignore[misc]
        pending = self._pending_masks
        if pending:
            for p in group["params"]:
                if id(p) in pending and self.state.get(p):
                    self.state[p]["child_mask"] = pending.pop(id(p))[1]
        if ct.MaskHyper.from_group(group).mode == "D":
            warn_if_no_d_mask(self, pending)
        if ct.MaskHyper.from_group(group).bernoulli and any("mask_stream" not in s for s in states):
            # a stable per-tensor stream id: the number set_mask_streams gave the parameter, else its
            # position in the optimizer (mask_streams.assign_streams)
            everything = list(chain.from_iterable(g["params"] for g in self.param_groups))
            fix_streams(everything, [self.state.get(p) for p in everything], group["params"])

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        saved = super().state_dict()  # type: ignore[misc]
        save_pending(self, saved, self._pending_masks)
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state_dict)  # type: ignore[misc]
        for p, state in list(self.state.items()):
            # stream ids are int64 host integers (the base moves non-floating state to the parameter's
            # device and keeps a converted checkpoint's integer dtype)
            stream = state.get("mask_stream")
            if isinstance(stream, Tensor) and (stream.device.type != "cpu" or stream.dtype != torch.int64):
                state["mask_stream"] = stream.to("cpu", torch.int64)
            mask = state.get("child_mask")
            if isinstance(mask, Tensor):
                # the kernels multiply by the stored bytes: keep them 0/1 and contiguous
                state["child_mask"] = (mask != 0).to(torch.uint8).contiguous()
        take_back_pending(self.state, self._pending_masks)
