"""What can be timed: torch.optim.Adam baselines and every optimfx optimizer, each defined once.

An :class:`Impl` is a name, a factory ``params -> optimizer`` and a byte model. optimfx optimizers
are discovered from ``optimfx.__all__`` (every exported :class:`~optimfx.optim.base.FxOptimizer`
subclass, once per backend), so a new optimizer joins the benchmarks by being exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer


#: Learning rate of every timed optimizer: tiny, so that hundreds of steps stay finite.
BENCH_LR = 1e-6
#: Backends an optimfx optimizer is registered with; ``auto`` is the one users get by default.
OPTIMFX_BACKENDS = ("auto", "reference", "compiled", "triton")
#: Steps before timing: the first allocates state (and compiles). The compiled backend recompiles
#: for several steps (its per-step float scalars are specialised), so it gets more.
_WARMUP = {"compiled": 10}
#: Constructor arguments besides ``lr`` and ``backend``, for optimizers whose defaults reject a
#: manual ``lr`` (AdaFactor's relative step).
BENCH_KWARGS: dict[str, dict[str, Any]] = {"AdaFactor": {"relative_step": False}}

Factory = Callable[[list[torch.Tensor]], Optimizer]


def state_bytes(optimizer: Optimizer, *, skip: tuple[str, ...] = ()) -> int:
    """Bytes held in the optimizer's state tensors (measure after a step: state is lazy)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key not in skip:
                total += value.numel() * value.element_size()
    return total


def one_pass_bytes(optimizer: Optimizer, params: list[torch.Tensor]) -> float:
    """Minimum bytes per parameter of a one-pass elementwise step (performance notes §5.1).

    Reads ``p``, ``g`` and every state buffer once, writes ``p`` and every state buffer once:
    ``3·|p| + 2·state`` per parameter, with the state measured from the optimizer (step counters
    excluded). fp32 Adam/AdaX: 12 + 2·8 = 28 B; all-bf16 torch Adam: 6 + 2·4 = 14 B; bf16
    parameters with fp32 optimfx state: 6 + 16 = 22 B.
    """
    numel = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return (3 * param_bytes + 2 * state_bytes(optimizer, skip=("step",))) / numel


#: Byte models of optimfx algorithms that are not one elementwise pass, by ``Algorithm.name``.
#: AdaFactor's exact design reads g three times and p twice and writes p (§4.3/§5.1: 24 B for
#: fp32), plus a read and a write of whatever full-size state it keeps (momentum).
MULTI_PASS_BYTES: dict[str, Callable[[Optimizer, list[torch.Tensor]], float]] = {
    "adafactor": lambda opt, params: one_pass_bytes(opt, params) + 3 * (
        sum(p.numel() * p.element_size() for p in params) / sum(p.numel() for p in params)),
}


@dataclass(frozen=True)
class Impl:
    """One optimizer implementation under test.

    Attributes:
        name: ``"<Optimizer>:<variant>"``, e.g. ``"torch.Adam:fused"`` or ``"AdaX:auto"``.
        family: ``"torch"`` (baseline) or ``"optimfx"``.
        factory: builds the optimizer over a parameter list, with ``lr = BENCH_LR``.
        bytes_per_param: ``(optimizer after a step, params) -> minimum bytes moved per parameter
            per step``, the byte model behind "effective GB/s" (28 for fp32 Adam and AdaX).
        unavailable: ``(device, dtype) -> reason`` when it cannot run there, else ``None``.
        warmup_steps: untimed steps before measuring.
        default: part of the default ``optimfx bench`` selection.
    """

    name: str
    family: str
    factory: Factory
    bytes_per_param: Callable[[Optimizer, list[torch.Tensor]], float]
    unavailable: Callable[[torch.device, torch.dtype], str | None]
    warmup_steps: int = 1
    default: bool = True

    @property
    def optimizer(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def variant(self) -> str:
        return self.name.split(":", 1)[1]


def _probe(device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.zeros(2, device=device, dtype=dtype, requires_grad=True)]


def _torch_adam(variant: str) -> Impl:
    kwargs: dict[str, Any] = {"single": {"foreach": False}, "foreach": {"foreach": True},
                              "fused": {"fused": True}}[variant]

    def factory(params: list[torch.Tensor]) -> Optimizer:
        return torch.optim.Adam(params, lr=BENCH_LR, **kwargs)

    def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            factory(_probe(device, dtype))
        except (RuntimeError, ValueError) as err:
            return str(err).splitlines()[0]
        return None

    return Impl(f"torch.Adam:{variant}", "torch", factory, one_pass_bytes, unavailable)


def torch_adam_default(device: torch.device | str) -> str:
    """Name of the ``torch.Adam`` variant that ``torch.optim.Adam(params)`` picks on ``device``."""
    device = torch.device(device)
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(_probe(device, torch.float32), False, False)
    except Exception:  # private torch API; fall back to the documented rule
        foreach = device.type == "cuda"
    return "torch.Adam:foreach" if foreach else "torch.Adam:single"


def optimfx_optimizers() -> dict[str, type]:
    """Every optimizer class ``optimfx`` exports, by name."""
    import optimfx
    from optimfx.optim.base import FxOptimizer

    found = {}
    for name in optimfx.__all__:
        obj = getattr(optimfx, name, None)
        if isinstance(obj, type) and issubclass(obj, FxOptimizer) and obj is not FxOptimizer:
            found[name] = obj
    return found


def _optimfx_impl(name: str, cls: type, backend: str) -> Impl:
    def factory(params: list[torch.Tensor]) -> Optimizer:
        return cls(params, lr=BENCH_LR, backend=backend, **BENCH_KWARGS.get(name, {}))

    def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        from .._dispatch import resolve_backend

        if backend == "compiled" and device.type not in ("cpu", "cuda"):
            return f"torch.compile is not benchmarked on {device.type}"
        try:
            resolve_backend(backend, _probe(device, dtype))
        except RuntimeError as err:
            return str(err)
        return None

    model = MULTI_PASS_BYTES.get(cls.algorithm.name, one_pass_bytes)
    return Impl(f"{name}:{backend}", "optimfx", factory, model, unavailable,
                warmup_steps=_WARMUP.get(backend, 1), default=backend == "auto")


def all_impls() -> dict[str, Impl]:
    """Every registered implementation by name: torch baselines first, then optimfx."""
    impls = [_torch_adam(v) for v in ("single", "foreach", "fused")]
    for name, cls in optimfx_optimizers().items():
        impls += [_optimfx_impl(name, cls, b) for b in OPTIMFX_BACKENDS]
    return {i.name: i for i in impls}


def select(names: Iterable[str] | None = None) -> list[Impl]:
    """Implementations by name; ``"AdaX"`` alone means ``"AdaX:auto"``, ``"torch.Adam"`` all three.

    ``None`` selects the defaults: the three torch.Adam variants and every optimfx optimizer with
    ``backend="auto"``. Raises ``KeyError`` naming the unknown entry.
    """
    registry = all_impls()
    if names is None:
        return [i for i in registry.values() if i.default]
    chosen: list[Impl] = []
    for name in names:
        if name in registry:
            matches = [registry[name]]
        elif name == "torch.Adam":
            matches = [i for i in registry.values() if i.optimizer == name]
        elif f"{name}:auto" in registry:
            matches = [registry[f"{name}:auto"]]
        else:
            raise KeyError(name)
        chosen += [m for m in matches if m not in chosen]
    return chosen

