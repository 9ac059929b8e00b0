"""Timing optimizer steps: warm-up outside the timed region, then round-robin rounds and medians.

The machines this runs on are noisy (±30 % between runs on the 2-core CI VM), so implementations
are interleaved: each round times one step of every implementation, in a rotated order, and the
figures are medians over rounds. On CUDA every timed step is bracketed by synchronisations.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.optim import Optimizer

from .presets import Preset, make_params
from .progress import bar
from .registry import Impl, state_bytes


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds one call of ``fn`` takes, including the device work it queues."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (``q`` in [0, 1]) of a non-empty sequence."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def resolved_backend(impl: Impl, optimizer: Optimizer) -> str:
    """What actually runs: the torch variant, or the backend optimfx's ``auto`` resolves to (for a
    wrapper, that of its own passes: EG's ``eg_backend``; ``"wrapper"`` for one that has none)."""
    if impl.family != "optimfx":
        return impl.variant
    from .._dispatch import resolve_backend

    group = optimizer.param_groups[0]
    backend = group.get("backend", group.get("eg_backend"))
    if backend is None:
        return "wrapper"
    return resolve_backend(backend, [p for p in group["params"] if p.grad is not None])


@dataclass
class Prepared:
    """An optimizer over its own copy of the parameters, warmed up and ready to time."""

    impl: Impl
    optimizer: Optimizer
    params: list[torch.Tensor]
    backend: str
    first_step_s: float
    warmup_s: float
    bytes_per_param: float
    state_bytes: int

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def prepare(impl: Impl, shapes: Preset | Sequence[tuple[int, ...]], device: torch.device | str,
            dtype: torch.dtype = torch.float32, *, warmup_steps: int | None = None,
            seed: int = 0) -> Prepared:
    """Build ``impl`` over fresh parameters and run its warm-up steps (state allocation, compile).

    Raises ``RuntimeError`` when the implementation cannot run on ``device``/``dtype``.
    """
    device = torch.device(device)
    reason = impl.unavailable(device, dtype)
    if reason is not None:
        raise RuntimeError(f"{impl.name} unavailable on {device}/{dtype}: {reason}")
    params = make_params(shapes, device, dtype, seed=seed)
    optimizer = impl.factory(params)
    first = timed(optimizer.step, device)
    steps = impl.warmup_steps if warmup_steps is None else warmup_steps
    rest = sum(timed(optimizer.step, device) for _ in range(max(steps - 1, 0)))
    return Prepared(impl, optimizer, params, resolved_backend(impl, optimizer), first, first + rest,
                    impl.bytes_per_param(optimizer, params), state_bytes(optimizer))


@dataclass
class Result:
    """Timed steps of one implementation (or why it could not run)."""

    name: str
    family: str
    backend: str | None = None
    n_params: int = 0
    bytes_per_param: float = 0.0
    state_bytes: int = 0
    first_step_s: float = 0.0
    warmup_s: float = 0.0
    seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.seconds)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gbps(self) -> float:
        """Effective bandwidth: the byte model's minimum bytes over the median step time."""
        return self.n_params * self.bytes_per_param / self.median_s / 1e9


def run_interleaved(impls: Sequence[Impl], shapes: Preset | Sequence[tuple[int, ...]],
                    device: torch.device | str, dtype: torch.dtype = torch.float32, *,
                    steps: int = 20, seed: int = 0,
                    log: Callable[[str], None] | None = None, show_progress: bool = False) -> list[Result]:
    """Time ``steps`` rounds of every implementation, round-robin, each on its own parameters.

    An implementation that fails to build or warm up gets a :class:`Result` with ``error`` set and
    is left out of the rounds; one that fails while timed keeps the steps it took. With
    ``show_progress``, the warm-ups and the rounds each get a progress bar.
    """
    device = torch.device(device)
    log = log or (lambda _msg: None)
    results: list[Result] = []
    prepared: list[tuple[Result, Prepared]] = []
    with bar(len(impls), "warm-up", enabled=show_progress, unit="impl") as progress:
        for impl in impls:
            result = Result(impl.name, impl.family)
            results.append(result)
            progress.set_postfix_str(impl.name)
            if not show_progress:
                log(f"warming up {impl.name} ({impl.warmup_steps} step{'s' * (impl.warmup_steps > 1)})")
            try:
                prep = prepare(impl, shapes, device, dtype, seed=seed)
            except Exception as err:  # report it in the table rather than abort the whole run
                result.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log(f"  {impl.name} skipped: {result.error}")
                gc.collect()
                progress.update()
                continue
            result.backend, result.n_params = prep.backend, prep.n_params
            result.bytes_per_param, result.state_bytes = prep.bytes_per_param, prep.state_bytes
            result.first_step_s, result.warmup_s = prep.first_step_s, prep.warmup_s
            prepared.append((result, prep))
            progress.update()
    if not show_progress:
        log(f"timing {len(prepared)} implementations, {steps} interleaved rounds")
    with bar(steps, "step time", enabled=show_progress, unit="round") as progress:
        for r in range(steps):
            k = r % max(len(prepared), 1)
            for result, prep in prepared[k:] + prepared[:k]:
                if result.error is not None:
                    continue
                try:
                    result.seconds.append(timed(prep.optimizer.step, device))
                except Exception as err:
                    result.error = f"{type(err).__name__}: {err}"
            progress.update()
    return results
