"""ChildTuning-D masks from the empirical Fisher information.

``build_fisher_mask`` makes one pass over the user's data in train mode (dropout on), accumulates
``F = Σ grad² / n_batches`` for the selected parameters (clipping each tensor's gradient to
``max_grad_norm`` first, as the official code does with the Trainer's 1.0), picks one threshold
across all of them and returns ``{parameter: bool mask}`` for
:meth:`optimfx.AdamW.set_gradient_mask`.

The threshold is an exact order statistic found by bisection on the bit patterns of the (non-negative)
Fisher values: ~31 counting passes and no concatenated copy, so it works for models far beyond
``torch.quantile``'s input limit.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from ._validation import check_choice, check_positive, check_range

Tensor = torch.Tensor
RULES = ("percentile", "topk")


def fisher_information(model: torch.nn.Module, batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], Tensor],
                       *, name_filter: str | Callable[[str], bool] = "layer",
                       max_grad_norm: float | None = 1.0, train: bool = True) -> dict[str, Tensor]:
    """Empirical Fisher ``F = mean over batches of grad²`` (fp32) for the selected parameters.

    Args:
        model: the model; its mode and gradients are as they were afterwards.
        batches: an iterable of batches, e.g. the training ``DataLoader``.
        loss_fn: ``(model, batch) -> scalar loss`` (the batch-mean loss).
        name_filter: a substring or a predicate on parameter names. Default: ``"layer"`` (official).
        max_grad_norm: clip each tensor's gradient to this norm before squaring, or ``None``.
            Default: ``1.0`` (official: the Trainer's ``max_grad_norm``).
        train: run the pass in train mode (dropout on), as the official code; ``False`` keeps the
            model's current mode. Default: ``True``.
    """
    if max_grad_norm is not None:
        check_positive("max_grad_norm", max_grad_norm)
    keep = (lambda n: name_filter in n) if isinstance(name_filter, str) else name_filter
    selected = {n: p for n, p in model.named_parameters() if p.requires_grad and keep(n)}
    if not selected:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        shown = ", ".join(map(repr, names[:6])) + (", ..." if len(names) > 6 else "")
        raise ValueError(f"Invalid name_filter: {name_filter!r} selects none of the model's trainable parameters "
                         f"({shown or 'none'}); pass a substring or a predicate that matches the tensors to mask")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in selected.items()}
    saved = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    modes = {m: m.training for m in model.modules()}
    if train:
        model.train()
    n_batches = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            n_batches += 1
            for n, p in selected.items():
                if p.grad is None:
                    continue
                g = p.grad.float()
                if max_grad_norm is not None:
                    norm = torch.linalg.vector_norm(g)
                    g = g * (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                fisher[n].addcmul_(g, g)
    finally:
        for module, training in modes.items():  # leave the model's modes and gradients as they were
            module.training = training
        for n, p in model.named_parameters():
            p.grad = saved[n]
    if n_batches == 0:
        raise ValueError("fisher_information: the data yielded no batch")
    return {n: f.div_(n_batches) for n, f in fisher.items()}


def _count_at_most(values: list[Tensor], bits: int) -> int:
    return int(sum(int((v.view(torch.int32) <= bits).sum()) for v in values))


def order_statistic(values: list[Tensor], rank: int) -> float:
    """The ``rank``-th smallest (0-based) of all non-negative float32 ``values``, exactly."""
    total = sum(v.numel() for v in values)
    if not 0 <= rank < total:
        raise ValueError(f"rank {rank} out of range for {total} values")
    lo, hi = 0, 0x7F800000  # bit patterns of +0.0 and +inf; order-preserving for x ≥ 0
    while lo < hi:
        mid = (lo + hi) // 2
        if _count_at_most(values, mid) >= rank + 1:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32))


def fisher_threshold(fisher: Mapping[str, Tensor], reserve_p: float, rule: str = "percentile") -> float:
    """One global threshold ``τ`` over all Fisher values; entries ``F ≥ τ`` are kept.

    ``"percentile"``: ``numpy.percentile(F_all, 100·(1 − reserve_p))`` with linear interpolation, the
    official rule (ties at ``τ`` are kept, so slightly more than ``reserve_p`` may survive).
    ``"topk"``: ``τ`` is the ``k``-th largest value, ``k = round(reserve_p · N)`` (:func:`build_fisher_mask`
    keeps exactly ``k`` entries, breaking ties at ``τ`` in parameter order).
    """
    _check_rule_and_p(reserve_p, rule)
    values = [f.detach().float().contiguous().clamp(min=0.0).flatten() for f in fisher.values()]
    total = sum(v.numel() for v in values)
    if total == 0:
        raise ValueError("fisher_threshold: no Fisher values")
    if rule == "topk":
        return order_statistic(values, total - _topk_count(reserve_p, total))
    position = (total - 1) * (1.0 - reserve_p)
    low = int(position)
    v_low = order_statistic(values, low)
    if low + 1 >= total or position == low:
        return v_low
    v_high = order_statistic(values, low + 1)
    return v_low + (position - low) * (v_high - v_low)


def _check_rule_and_p(reserve_p: float, rule: str) -> None:
    check_choice("rule", rule, RULES)
    check_range("reserve_p", reserve_p, 0.0, 1.0, low_open=True)


def _topk_count(reserve_p: float, total: int) -> int:
    return max(1, round(reserve_p * total))


def _exactly_topk(fisher: Mapping[str, Tensor], tau: float, k: int) -> dict[str, Tensor]:
    """``F > τ``, plus the first entries equal to ``τ`` (parameter order, then element order) up to
    ``k`` in all."""
    masks = {n: f > tau for n, f in fisher.items()}
    missing = k - sum(int(m.sum()) for m in masks.values())
    for n, f in fisher.items():
        if missing <= 0:
            break
        ties = (f == tau).flatten().nonzero().flatten()[:missing]
        masks[n].view(-1)[ties] = True
        missing -= ties.numel()
    return masks


def build_fisher_mask(model: torch.nn.Module, batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], Tensor],
                      reserve_p: float, *, name_filter: str | Callable[[str], bool] = "layer",
                      max_grad_norm: float | None = 1.0, rule: str = "percentile",
                      train: bool = True) -> dict[Tensor, Tensor]:
    """ChildTuning-D masks: ``{parameter: bool mask}`` for the parameters ``name_filter`` selects.

    Args:
        model: the model to fine-tune.
        batches: the training data (e.g. the ``DataLoader``), one pass is made.
        loss_fn: ``(model, batch) -> scalar loss``.
        reserve_p: fraction of the selected entries to keep trainable, in (0, 1].
        name_filter: substring or predicate selecting the masked tensors. Default: ``"layer"``
            (official: the Transformer blocks).
        max_grad_norm: per-tensor gradient clipping before squaring, or ``None``. Default: ``1.0``
            (official: the Trainer's default ``max_grad_norm``).
        rule: ``"percentile"`` (official: entries ``F ≥ τ``, ties kept) or ``"topk"`` (exactly
            ``round(reserve_p·N)`` entries), see :func:`fisher_threshold`. Default: ``"percentile"``.
        train: compute the Fisher information in train mode (dropout on), as the official code; the
            model's mode is restored afterwards. Default: ``True``.

    Returns:
        ``{parameter: bool tensor}``; ``True`` marks the child network.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
        >>> loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        >>> masks = optimfx.build_fisher_mask(model, data, loss, reserve_p=0.3, name_filter="0.")
        >>> opt = optimfx.ChildTuningAdamW(model.parameters(), lr=1e-3, mode="ChildTuning-D")
        >>> opt.set_gradient_mask(masks)
    """
    _check_rule_and_p(reserve_p, rule)  # before the pass over the data
    fisher = fisher_information(model, batches, loss_fn, name_filter=name_filter, max_grad_norm=max_grad_norm,
                                train=train)
    tau = fisher_threshold(fisher, reserve_p, rule)
    params = dict(model.named_parameters())
    if rule == "topk":
        masks = _exactly_topk(fisher, tau, _topk_count(reserve_p, sum(f.numel() for f in fisher.values())))
        return {params[n]: m for n, m in masks.items()}
    return {params[n]: f >= tau for n, f in fisher.items()}
