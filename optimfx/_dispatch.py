"""The one place that chooses and runs a backend.

=============  =================================================================================
``reference``  plain PyTorch, one tensor at a time (the specification; default off CUDA)
``triton``     fused multi-tensor kernels, one launch per pass for all tensors of a group (default
               on CUDA; runs on CPU tensors under ``TRITON_INTERPRET=1``)
``compiled``   ``torch.compile`` of the reference
=============  =================================================================================
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections import defaultdict
from operator import attrgetter
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

from ._algorithm import Algorithm
from ._counters import StepCounters
from ._precision import round_key, rounding, working_copy

Tensor = torch.Tensor
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_dtype_of = attrgetter("dtype")
_is_cuda = attrgetter("is_cuda")


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it; once imported, a dict lookup)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported_reason(params: Sequence[Tensor]) -> str | None:
    """Why the Triton backend cannot run these tensors, or ``None`` when it can."""
    if not triton_available():
        return "Triton is not installed (pip install 'optimfx[triton]', Linux only)"
    for dtype in set(map(_dtype_of, params)):
        if dtype not in _TRITON_DTYPES:
            return f"the Triton kernels take float32/bfloat16/float16 parameters, got {dtype}"
    devices = {p.device for p in params}
    if len(devices) > 1:
        # one launch per pass takes one device's tensors (model-parallel groups, device_map="auto")
        return (f"the Triton kernels step one device's tensors per param group, got {sorted(map(str, devices))} "
                "(one param group per device runs them)")
    if all(map(_is_cuda, params)):
        return None
    on_cpu_ok = interpreting()
    for p in params:
        if not (p.is_cuda or (on_cpu_ok and p.device.type == "cpu")):
            return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {p.device}"
    return None


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for kernel launches: Triton launches on the current CUDA device and
    stream, which need not be the parameters' (a model placed on ``cuda:1``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def resolve_backend(requested: str, params: Sequence[Tensor]) -> str:
    """Map ``"auto"`` to a concrete backend for a group's tensors.

    Args:
        requested: ``"auto"``, ``"reference"``, ``"triton"`` or ``"compiled"``.
        params: the group's parameters that take a step.

    Returns:
        ``"triton"`` for ``"auto"`` when every parameter is a float32/bfloat16/float16 tensor on one
        CUDA device and Triton is installed, else ``"reference"``; an explicit choice unchanged.

    Raises:
        RuntimeError: ``"triton"`` was requested but cannot run these tensors (the message says why).
    """
    if requested == "auto":
        on_cuda = bool(params) and all(map(_is_cuda, params))
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


def _graph_scalar(x: Any) -> Tensor:
    """A host float (or the user's tensor lr) as a 0-d float64 tensor, a graph input of the compiled step."""
    return x.detach().to(torch.float64) if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float64)


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_step(algo: Algorithm) -> Callable[..., None]:
    fn = _COMPILED.get(algo.name)
    if fn is None:
        # The step scalars and lr arrive as 0-d float64 tensors (graph inputs: no recompile as the
        # step advances or a scheduler moves lr; torch 2.13's specialize_float=False baked the first
        # value of a float passed as alpha=/value= into a cached kernel). Shapes are dynamic, so
        # the graphs are one per rank and branch, not one per shape: a model with more distinct
        # shapes than Dynamo's recompile limit (8) would otherwise fall back to eager.
        fn = torch.compile(algo.reference_step, fullgraph=False, dynamic=True)
        _COMPILED[algo.name] = fn
    return fn


def all_finite(grads: list[Tensor]) -> bool:
    """Host check that no gradient holds inf/NaN (a device sync on CUDA; the Triton path avoids it).

    A finite sum proves every element finite: inf and NaN propagate into it (``inf − inf`` is NaN).
    On CPU the plain sums are the cheapest full read (about 1.8x cheaper than ``_foreach_norm``, which
    accumulates fp32 in float64, on 16 × 1024² tensors); on CUDA the foreach 2-norm is one launch for
    all tensors. Only when a sum is not finite, a non-finite element or an overflow, the exact
    inf-norm decides.
    """
    # meta tensors (shape tracing, FLOP counting) hold no values to check
    grads = [g for g in grads if g.numel() > 0 and g.device.type != "meta"]
    if not grads:
        return True
    device = grads[0].device
    if device.type == "cuda":
        totals = torch._foreach_norm(grads, 2)
    else:
        # half types sum in fp32 (an fp16 total overflows at 65504)
        totals = [g.sum(dtype=torch.float32) if g.element_size() < 4 else g.sum() for g in grads]
    if _norms_finite(totals, device):
        return True
    return _norms_finite(torch._foreach_norm(grads, float("inf")), device)


def _norms_finite(norms: Sequence[Tensor], device: torch.device) -> bool:
    return bool(torch.stack([n.to(device) for n in norms]).isfinite().all())


@torch.compiler.disable
def run(algo: Algorithm, backend: str, params: list[Tensor], grads: list[Tensor],
        states: list[dict[str, Tensor]], step_counts: StepCounters, hyper: Any, lr: Any,
        skip_nonfinite: bool, *, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
        rounding_seed: int | None = None) -> bool:
    """Apply one step of ``algo`` to a group's tensors (already real views, with grads).

    ``states[i]`` is the state dict of tensor ``i`` (``algo.init_state`` buffers); ``step_counts`` holds their
    int64 CPU step counters (``state["step"]``), advanced here.

    A step is skipped, leaving parameters, state and step counters untouched, when ``found_inf``
    (``torch.amp.GradScaler``'s flag) is non-zero or, with ``skip_nonfinite`` and no ``found_inf``,
    when a gradient holds inf/NaN. The reference backends decide on the host. The Triton backend
    decides on the device (no host sync): its kernels read the flag, and the counters, advanced
    optimistically, are corrected when the flag is read back, right away for CPU tensors and at the
    group's next ``run`` (or ``state_dict``) for CUDA tensors, once the flag's copy has arrived.

    ``grad_scale`` (GradScaler's scale) divides the gradients, in private fp32 copies (``p.grad`` is
    never written). ``rounding_seed`` selects stochastic rounding of bf16 parameters, keyed by
    ``(rounding_seed, step)`` (:func:`optimfx._precision.round_key`); ``None`` rounds to nearest even.

    Runs outside ``torch.compile`` graphs (``torch.compiler.disable``): inside a compiled training step
    the whole optimizer update is one eager region whose host scalars are exact float64, so no step
    count or scalar is baked into a graph and nothing recompiles as the step advances.

    Returns:
        ``False`` when the step was skipped by the non-finite check here (the caller reports it);
        ``True`` otherwise, also when GradScaler's ``found_inf`` skipped it (the scaler reports those).
    """
    settle_skips(step_counts.tensors)
    if backend == "triton":
        with on_device(params[0].device):
            _run_triton(algo, params, grads, states, step_counts, hyper, lr, skip_nonfinite, grad_scale,
                        found_inf, rounding_seed)
        return True
    compiled = backend == "compiled"
    group_step = None if compiled else algo.group_step
    # the group step's kernel checks the gradients in a pass it makes anyway
    check_in_group = (skip_nonfinite and found_inf is None and group_step is not None
                      and algo.group_step_checks_finite)
    if found_inf is not None:
        if bool(found_inf):
            return True
    elif skip_nonfinite and not check_in_group and not all_finite(grads):
        return False
    if grad_scale is not None:
        grads = _unscaled(grads, grad_scale)
    step_counts.advance()
    step_fn = _compiled_step(algo) if compiled else algo.reference_step
    lr_f = _graph_scalar(lr) if compiled else _host_lr(lr)
    scalars: dict[int, Any] = {}

    def scalars_of(step: int) -> Any:
        sc = scalars.get(step)
        if sc is None:
            sc = algo.scalars(step, hyper)
            sc = scalars[step] = type(sc)(*map(_graph_scalar, sc)) if compiled else sc
        return sc

    steps = step_counts.values()
    todo: Iterable[int] = range(len(params))
    if group_step is not None:
        check = {"check_finite": True} if check_in_group else {}
        left = group_step(params, grads, states, steps, hyper, lr_f, scalars_of,
                          stochastic_bf16=rounding_seed is not None, **check)
        if left is None:  # a gradient holds inf/NaN: nothing was written
            step_counts.advance(-1)
            return False
        todo = left
    for i in todo:
        p, g, state, step = params[i], grads[i], states[i], steps[i]
        sc = scalars_of(step)
        if compiled:
            # Dynamo keeps an nn.Parameter's shape static; a plain alias of it gets a dynamic one
            p = p.detach()
        if rounding_seed is None:
            step_fn(p, g, state, hyper, sc, lr_f)
            continue
        with rounding(round_key(rounding_seed, step)):
            step_fn(p, g, state, hyper, sc, lr_f)
    return True


def _unscaled(grads: list[Tensor], grad_scale: Tensor) -> list[Tensor]:
    """Private copies ``g · (1 / scale)`` in the compute dtype, ``1 / scale`` rounded to fp32 as
    ``GradScaler.unscale_`` does (so fp32 gradients get the bits its in-place unscale would give)."""
    inv = grad_scale.detach().double().reciprocal().float()
    return [working_copy(g).mul(inv.to(g.device)) if g.dtype != torch.float64
            else g.mul(inv.to(g.device, torch.float64)) for g in grads]


def _run_triton(algo: Algorithm, params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Tensor]], step_counts: StepCounters, hyper: Any, lr: Any,
                skip_nonfinite: bool, grad_scale: Tensor | None, found_inf: Tensor | None,
                rounding_seed: int | None) -> None:
    kernels = importlib.import_module(f"optimfx._kernels.{algo.name}")
    step_counts.advance()
    steps = step_counts.values()
    by_step = _indices_by_step(steps)
    flag, fused_scan = None, False
    if found_inf is not None or grad_scale is not None or skip_nonfinite:
        checks = importlib.import_module("optimfx._kernels.checks")
        # GradScaler's found_inf already covers every gradient: no second scan
        scan = skip_nonfinite and found_inf is None
        # kernels that read every gradient in a first pass that writes only scratch can raise the
        # flag there (one launch for the group: every pass after it sees the flag)
        fused_scan = scan and grad_scale is None and len(by_step) == 1 and getattr(kernels, "SCANS_NONFINITE", False)
        flag = checks.nonfinite_flag(grads, found_inf, check=scan and grad_scale is None and not fused_scan)
        if grad_scale is not None:
            grads = checks.unscaled(grads, grad_scale, flag, check=scan)
    for idx in by_step.values():
        sc = algo.scalars(steps[idx[0]], hyper)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        extra: dict[str, Any] = {"scan_nonfinite": True} if fused_scan else {}
        if rounding_seed is not None and any(params[i].dtype == torch.bfloat16 for i in idx):
            extra["round_key"] = round_key(rounding_seed, steps[idx[0]])
        kernels.launch(pick(params), pick(grads), pick(states), hyper, sc, lr, flag, **extra)
    if flag is not None:
        _defer_skip(flag, step_counts)


class _PendingSkip(NamedTuple):
    counters: StepCounters  # the counters one Triton step advanced (held: their ids stay unique)
    flag: Tensor  # host copy of the step's device skip flag
    ready: Any  # a CUDA event recorded after the copy


#: ``id(counter) → _PendingSkip``: step counters advanced by a Triton step whose skip flag has not
#: been read back yet (one record per step of a group; CPU flags are settled at once)
_pending_skips: dict[int, _PendingSkip] = {}


def _defer_skip(flag: Tensor, step_counts: StepCounters) -> None:
    if flag.device.type == "cpu":
        if int(flag[0]) != 0:
            step_counts.advance(-1)
        return
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    record = _PendingSkip(step_counts, host, ready)
    _pending_skips.update(dict.fromkeys(map(id, step_counts.tensors), record))


def settle_skips(step_counts: Iterable[Tensor]) -> None:
    """Take back the increment of counters whose Triton step turned out skipped.

    Waits only for the flag's copy (recorded right after the step's kernels), never for work queued
    since, so in a training loop it finds the copy done and costs no stall. Only the records of
    ``step_counts`` are settled: another optimizer's step just queued is not waited for.
    """
    if not _pending_skips:
        return
    found = {id(r): r for r in map(_pending_skips.get, map(id, step_counts)) if r is not None}
    for record in found.values():
        for t in record.counters.tensors:
            if _pending_skips.get(id(t)) is record:
                del _pending_skips[id(t)]
        record.ready.synchronize()
        if int(record.flag[0]) != 0:
            record.counters.advance(-1)


def _indices_by_step(steps: list[int]) -> dict[int, list[int]]:
    """Tensors that took the same number of steps share host scalars, hence one launch."""
    if steps[0] == steps[-1] and len(set(steps)) == 1:
        return {steps[0]: list(range(len(steps)))}
    out: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(steps):
        out[s].append(i)
    return out
