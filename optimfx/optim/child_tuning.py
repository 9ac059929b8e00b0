"""``ChildTuning``: ChildTuning gradient masks around any ``torch.optim`` optimizer (the slower adapter).

With optimfx's :class:`~optimfx.AdamW` the mask is fused into the update (``child_tuning_mode=``); this
adapter serves every other optimizer. During the base's ``step()`` each ``p.grad`` is swapped for a
masked copy and the user's gradient object is put back afterwards, so ``p.grad`` is never modified.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Callable, Mapping

import torch
from torch.optim import Optimizer

from .._precision import compute_dtype
from .._validation import check_range
from ..reference import child_tuning as ct

Tensor = torch.Tensor


class ChildTuning(Optimizer):
    r"""Apply ChildTuning-F or -D gradient masks before any optimizer's step.

    .. math::

        \tilde g_t = g_t \odot M_t / p_F \ \text{(F: fresh Bernoulli mask each step)}, \qquad
        \tilde g_t = g_t \odot M \ \text{(D: fixed Fisher mask)}

    Args:
        base: the optimizer to feed masked gradients (param groups and schedulers are shared).
        mode: ``"F"``/``"ChildTuning-F"`` or ``"D"``/``"ChildTuning-D"``.
        reserve_p: keep probability of F-mode masks, in (0, 1]. Default: ``1.0``.
        seed: key of the mask stream: same seed, same masks (also across DDP ranks). Default: ``0``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = optimfx.ChildTuning(torch.optim.SGD(model.parameters(), lr=0.1), mode="F", reserve_p=0.3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(self, base: Optimizer, mode: str, reserve_p: float = 1.0, seed: int = 0) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"ChildTuning wraps a torch.optim.Optimizer, got {type(base).__name__}")
        mode = ct.normalise_mode(mode)
        if mode not in ("F", "D"):
            raise ValueError(f"Invalid mode: {mode!r} (must be 'F', 'D', 'ChildTuning-F' or 'ChildTuning-D')")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int)")
        self.base = base
        defaults = dict(child_tuning_mode=mode, reserve_p=check_range("reserve_p", reserve_p, 0.0, 1.0,
                                                                      low_open=True), seed=seed)
        super().__init__(base.param_groups, defaults)
        self.param_groups = base.param_groups

    def set_gradient_mask(self, gradient_mask: Mapping[Tensor, Tensor]) -> None:
        """D-mode masks ``{parameter: mask}``, stored as uint8 in the state (checkpointed)."""
        for p, mask in gradient_mask.items():
            if mask.shape != p.shape:
                raise ValueError(f"set_gradient_mask: mask shape {tuple(mask.shape)} does not match "
                                 f"parameter shape {tuple(p.shape)}")
            self.state[p]["child_mask"] = (mask != 0).to(device=p.device, dtype=torch.uint8)

    def _masked(self, index: int, p: Tensor, group: dict) -> Tensor:
        grad = p.grad
        state = self.state[p]
        step = state.get("step")
        step = torch.zeros((), dtype=torch.int64) if step is None else step
        step += 1
        state["step"] = step
        if group["child_tuning_mode"] == "F":
            if group["reserve_p"] >= 1.0:
                return grad
            key = ct.mask_key(group["seed"], index, int(step))
            keep = ct.bernoulli_keep(grad.shape, group["reserve_p"], key, grad.device)
            g32 = grad.to(compute_dtype(grad.dtype))
            return ct.apply_mask(g32, keep, 1.0 / group["reserve_p"]).to(grad.dtype)
        if "child_mask" in state:
            return ct.apply_mask(grad, state["child_mask"].bool(), 1.0)
        return grad

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Mask the gradients, run the base step, restore the user's gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        originals: list[tuple[Tensor, Tensor]] = []
        try:
            params = chain.from_iterable(g["params"] for g in self.param_groups)
            groups = chain.from_iterable([g] * len(g["params"]) for g in self.param_groups)
            for index, (p, group) in enumerate(zip(params, groups)):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ChildTuning does not support sparse gradients")
                originals.append((p, p.grad))
                p.grad = self._masked(index, p, group)
            self.base.step()
        finally:
            for p, grad in originals:
                p.grad = grad
        return loss

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["base"] = self.base.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.base.load_state_dict(state_dict.pop("base"))
        super().load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        for state in self.state.values():  # torch casts every state tensor to the param dtype on load
            if "child_mask" in state:
                state["child_mask"] = (state["child_mask"] != 0).to(torch.uint8)
