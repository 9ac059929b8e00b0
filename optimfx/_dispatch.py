"""The one place that chooses and runs a backend.

=============  =================================================================================
``reference``  plain PyTorch, one tensor at a time (the specification; default off CUDA)
``triton``     fused multi-tensor kernels, one launch per pass for all tensors of a group (default
               on CUDA; runs on CPU tensors under ``TRITON_INTERPRET=1``)
``compiled``   ``torch.compile`` of the reference
=============  =================================================================================
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from ._algorithm import Algorithm

Tensor = torch.Tensor
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported_reason(params: Sequence[Tensor]) -> str | None:
    """Why the Triton backend cannot run these tensors, or ``None`` when it can."""
    if not triton_available():
        return "Triton is not installed (pip install 'optimfx[triton]', Linux only)"
    for p in params:
        if p.dtype not in _TRITON_DTYPES:
            return f"the Triton kernels take float32/bfloat16/float16 parameters, got {p.dtype}"
        if not (p.is_cuda or (interpreting() and p.device.type == "cpu")):
            return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {p.device}"
    return None


def resolve_backend(requested: str, params: Sequence[Tensor]) -> str:
    """Map ``"auto"`` to a concrete backend for a group's tensors.

    Args:
        requested: ``"auto"``, ``"reference"``, ``"triton"`` or ``"compiled"``.
        params: the group's parameters that take a step.

    Returns:
        ``"triton"`` for ``"auto"`` when every parameter is a float32/bfloat16/float16 CUDA tensor and
        Triton is installed, else ``"reference"``; an explicit choice unchanged.

    Raises:
        RuntimeError: ``"triton"`` was requested but cannot run these tensors (the message says why).
    """
    if requested == "auto":
        on_cuda = bool(params) and all(p.is_cuda for p in params)
        if on_cuda and triton_unsupported_reason(params) is None:
            return "triton"
        return "reference"
    if requested == "triton":
        reason = triton_unsupported_reason(params)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return requested


def _host_lr(lr: Any) -> float:
    return float(lr) if isinstance(lr, Tensor) else lr


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_step(algo: Algorithm) -> Callable[..., None]:
    fn = _COMPILED.get(algo.name)
    if fn is None:
        # specialize_float=False gave wrong steps in torch 2.13: a float passed as a Scalar argument
        # (``alpha=``/``value=``) is specialised anyway, and the FX graph cache reuses the kernel
        # with the first value baked in. Floats stay constants (a recompile per step) until the
        # step scalars reach the graph as tensors.
        fn = torch.compile(algo.reference_step, fullgraph=False, dynamic=False)
        _COMPILED[algo.name] = fn
    return fn


def all_finite(grads: list[Tensor]) -> bool:
    """Host check that no gradient holds inf/NaN (a device sync on CUDA; the Triton path avoids it).

    A finite 2-norm proves every element finite (inf/NaN propagate into it), and the foreach 2-norm
    is ~4x cheaper on CPU than the inf-norm. Only when a 2-norm is not finite, a non-finite
    element or an overflowing sum of squares, the exact inf-norm decides.
    """
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return True
    if _norms_finite(torch._foreach_norm(grads, 2), grads[0].device):
        return True
    return _norms_finite(torch._foreach_norm(grads, float("inf")), grads[0].device)


def _norms_finite(norms: Sequence[Tensor], device: torch.device) -> bool:
    return bool(torch.stack([n.to(device) for n in norms]).isfinite().all())


def run(algo: Algorithm, backend: str, params: list[Tensor], grads: list[Tensor],
        states: list[dict[str, Tensor]], step_counts: list[Tensor], hyper: Any, lr: Any,
        skip_nonfinite: bool) -> bool:
    """Apply one step of ``algo`` to a group's tensors (already real views, with grads).

    ``states[i]`` is the state dict of tensor ``i`` (``algo.init_state`` buffers); ``step_counts[i]`` is
    its int64 CPU step counter, incremented here. With ``skip_nonfinite`` a step whose gradients
    hold inf/NaN leaves parameters and state untouched: checked on the host for the reference
    backends (returns ``False`` when skipped), on the device for Triton (the step counters still
    advance there, since reading the flag would synchronise).
    """
    if skip_nonfinite and backend != "triton" and not all_finite(grads):
        return False
    for t in step_counts:
        t += 1
    steps = [int(t) for t in step_counts]
    if backend == "triton":
        kernels = importlib.import_module(f"optimfx._kernels.{algo.name}")
        flag = None
        if skip_nonfinite:
            flag = importlib.import_module("optimfx._kernels.checks").nonfinite_flag(grads)
        for idx in _indices_by_step(steps).values():
            sc = algo.scalars(steps[idx[0]], hyper)
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            kernels.launch(pick(params), pick(grads), pick(states), hyper, sc, lr, flag)
        return True
    step_fn = _compiled_step(algo) if backend == "compiled" else algo.reference_step
    lr_f = _host_lr(lr)
    for i, (p, g) in enumerate(zip(params, grads)):
        step_fn(p, g, states[i], hyper, algo.scalars(steps[i], hyper), lr_f)
    return True


def _indices_by_step(steps: list[int]) -> dict[int, list[int]]:
    """Tensors that took the same number of steps share host scalars, hence one launch."""
    out: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(steps):
        out[s].append(i)
    return out
