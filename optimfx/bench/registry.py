"""What ``optimfx bench`` runs: the implementations it times and the contenders of its race.

* An :class:`Impl` is a name, a factory ``params -> optimizer`` and a byte model: the
  ``torch.optim.Adam`` and ``torch.optim.Adafactor`` baselines and every optimfx optimizer, once
  per backend. optimfx optimizers are discovered from ``optimfx.__all__`` (every exported
  :class:`~optimfx.optim.base.FxOptimizer` subclass), so a new optimizer joins the timing by being
  exported; the wrappers (:data:`WRAPPER_FACTORIES`) are timed around the optimizer they race with.
* A :class:`Contender` is an optimizer of the convergence race with the hyperparameters it races
  with (:data:`RACE_RECIPES`): the torch baselines and every optimizer-like name optimfx exports,
  adapters included. A recipe whose name optimfx does not export is not offered.
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
#: Steps before timing: the first allocates state (and compiles). The compiled backend gets a few
#: more, so that its first timed step is not the one that finishes compiling.
_WARMUP = {"compiled": 3}
#: Constructor arguments besides ``lr`` and ``backend``: for optimizers whose defaults reject a
#: manual ``lr`` (AdaFactor's relative step), and ChildTuningAdamW timed as it races (F mode,
#: ``reserve_p=0.3``), so its row shows the cost of the masks beside AdamW's.
BENCH_KWARGS: dict[str, dict[str, Any]] = {
    "AdaFactor": {"relative_step": False},
    "ChildTuningAdamW": {"mode": "ChildTuning-F", "reserve_p": 0.3},
}
#: Wrappers and adapters (no backend of their own: one implementation, ``"<name>:auto"``), timed
#: around the optimizer they race with: ``factory(optimfx, params)``.
WRAPPER_FACTORIES: dict[str, Callable[[Any, list[torch.Tensor]], Optimizer]] = {
    "ChildTuning": lambda fx, p: fx.ChildTuning(torch.optim.Adam(p, lr=BENCH_LR), mode="F", reserve_p=0.3),
    "EGStepSize": lambda fx, p: fx.EGStepSize(torch.optim.Adam(p, lr=BENCH_LR)),
    "Funnel": lambda fx, p: fx.Funnel(p, lr=BENCH_LR),
}

Factory = Callable[[list[torch.Tensor]], Optimizer]


def state_bytes(optimizer: Optimizer, *, skip: tuple[str, ...] = ()) -> int:
    """Bytes held in the optimizer's state tensors (measure after a step: state is lazy).

    A wrapper's ``base`` optimizer (``EGStepSize``, ``ChildTuning``) is counted with it, and so are
    the per-parameter buffers a wrapper keeps between steps outside its state (EG's saved θ).
    """
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key not in skip:
                total += value.numel() * value.element_size()
    scratch = getattr(optimizer, "_scratch", None)
    if isinstance(scratch, dict):
        total += sum(v.numel() * v.element_size() for v in scratch.values() if isinstance(v, torch.Tensor))
    base = getattr(optimizer, "base", None)
    if isinstance(base, Optimizer):
        total += state_bytes(base, skip=skip)
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


#: torch baselines: ``optimizer -> {variant: constructor kwargs}`` (``torch.optim.Adafactor`` has
#: no fused path).
TORCH_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "Adam": {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}},
    "Adafactor": {"single": {"foreach": False}, "foreach": {"foreach": True}},
}


def _torch_impl(optimizer: str, variant: str) -> Impl:
    cls = getattr(torch.optim, optimizer)
    kwargs = TORCH_VARIANTS[optimizer][variant]

    def factory(params: list[torch.Tensor]) -> Optimizer:
        return cls(params, lr=BENCH_LR, **kwargs)

    def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            factory(_probe(device, dtype))
        except (RuntimeError, ValueError) as err:
            return str(err).splitlines()[0]
        return None

    model = MULTI_PASS_BYTES.get(optimizer.lower(), one_pass_bytes)
    return Impl(f"torch.{optimizer}:{variant}", "torch", factory, model, unavailable)


def torch_default_variant(device: torch.device | str) -> str:
    """The variant (``"single"`` or ``"foreach"``) a torch optimizer picks by default on ``device``."""
    device = torch.device(device)
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(_probe(device, torch.float32), False, False)
    except Exception:  # private torch API; fall back to the documented rule
        foreach = device.type == "cuda"
    return "foreach" if foreach else "single"


def torch_adam_default(device: torch.device | str) -> str:
    """Name of the ``torch.Adam`` variant that ``torch.optim.Adam(params)`` picks on ``device``."""
    return f"torch.Adam:{torch_default_variant(device)}"


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


def _wrapper_impl(name: str, make: Callable[[Any, list[torch.Tensor]], Optimizer]) -> Impl:
    import optimfx

    # byte model: one pass over the parameter and every state buffer, the base's included (the
    # generic wrappers move more: they are not fused with their base)
    return Impl(f"{name}:auto", "optimfx", lambda params: make(optimfx, params), one_pass_bytes,
                lambda device, dtype: None)


def all_impls() -> dict[str, Impl]:
    """Every registered implementation by name: torch baselines first, then optimfx."""
    import optimfx

    impls = [_torch_impl(opt, v) for opt, variants in TORCH_VARIANTS.items() if hasattr(torch.optim, opt)
             for v in variants]
    for name, cls in optimfx_optimizers().items():
        impls += [_optimfx_impl(name, cls, b) for b in OPTIMFX_BACKENDS]
    impls += [_wrapper_impl(name, make) for name, make in WRAPPER_FACTORIES.items() if name in optimfx.__all__]
    return {i.name: i for i in impls}


def select(names: Iterable[str] | None = None) -> list[Impl]:
    """Implementations by name; ``"AdaX"`` alone means ``"AdaX:auto"``, ``"torch.Adam"`` every
    torch.Adam variant.

    ``None`` selects the defaults: every torch variant and every optimfx optimizer with
    ``backend="auto"``. Raises ``KeyError`` naming the unknown entry.
    """
    registry = all_impls()
    if names is None:
        return [i for i in registry.values() if i.default]
    chosen: list[Impl] = []
    for name in names:
        if name in registry:
            matches = [registry[name]]
        elif name.startswith("torch.") and any(i.optimizer == name for i in registry.values()):
            matches = [i for i in registry.values() if i.optimizer == name]
        elif f"{name}:auto" in registry:
            matches = [registry[f"{name}:auto"]]
        else:
            raise KeyError(name)
        chosen += [m for m in matches if m not in chosen]
    return chosen



# --- the convergence race -----------------------------------------------------------------------

RaceFactory = Callable[[Any, list[torch.Tensor]], Optimizer]

#: The race's contenders, ``name -> (settings shown in the report, factory(optimfx, params))``.
#: Learning rates are each optimizer's own default (the author's setting), except where the
#: default turns a feature off: ChildTuningAdamW and the ChildTuning adapter race in F mode with
#: the paper's ``reserve_p=0.3``, and EGStepSize adapts ``torch.optim.Adam`` at its default lr.
RACE_RECIPES: dict[str, tuple[str, RaceFactory]] = {
    "torch.Adam": ("lr=1e-3 (default)", lambda fx, p: torch.optim.Adam(p)),
    "torch.Adafactor": ("lr=1e-2 (default: cap of the relative step)",
                        lambda fx, p: torch.optim.Adafactor(p)),
    "AdaFactor": ("relative step, lr=None (defaults)", lambda fx, p: fx.AdaFactor(p)),
    "AdamW": ("lr=1e-3, weight_decay=1e-2 (defaults)", lambda fx, p: fx.AdamW(p)),
    "AdaX": ("lr=1.5e-3, weight_decay=5e-4 (defaults)", lambda fx, p: fx.AdaX(p)),
    "AdaXW": ("lr=5e-3, weight_decay=5e-2 (defaults)", lambda fx, p: fx.AdaXW(p)),
    "ChildTuningAdamW": ("lr=1e-3, mode='ChildTuning-F', reserve_p=0.3",
                         lambda fx, p: fx.ChildTuningAdamW(p, mode="ChildTuning-F", reserve_p=0.3)),
    "ChildTuning": ("torch.optim.Adam(lr=1e-3), mode='F', reserve_p=0.3",
                    lambda fx, p: fx.ChildTuning(torch.optim.Adam(p), mode="F", reserve_p=0.3)),
    "EGStepSize": ("torch.optim.Adam(lr=1e-3), EG defaults", lambda fx, p: fx.EGStepSize(torch.optim.Adam(p))),
    "Funnel": ("SGD lr=0.1, momentum=0.9 (defaults)", lambda fx, p: fx.Funnel(p)),
}


@dataclass(frozen=True)
class Contender:
    """One optimizer of the convergence race.

    Attributes:
        name: ``"torch.Adam"`` or an ``optimfx`` export name (``"AdaX"``, ``"Funnel"``).
        family: ``"torch"`` or ``"optimfx"``.
        settings: the hyperparameters it races with, for the report.
        factory: builds it over a parameter list.
    """

    name: str
    family: str
    settings: str
    factory: Callable[[list[torch.Tensor]], Optimizer]

    def impl_name(self, device: torch.device | str) -> str:
        """The timed implementation this contender runs as on ``device`` (its default path)."""
        if self.name == "torch.Adafactor":
            return "torch.Adafactor:single"  # its foreach=None means the for-loop on every device
        if self.family == "torch":
            return f"{self.name}:{torch_default_variant(device)}"
        # adapters and wrappers (ChildTuning, EGStepSize, Funnel) have one implementation, ":auto"
        timed = self.name in optimfx_optimizers() or self.name in WRAPPER_FACTORIES
        return f"{self.name}:auto" if timed else self.name


def all_contenders() -> dict[str, Contender]:
    """Every race contender by name: the torch baselines, then what ``optimfx`` exports."""
    import optimfx

    out = {}
    for name, (settings, make) in RACE_RECIPES.items():
        family = "torch" if name.startswith("torch.") else "optimfx"
        available = hasattr(torch.optim, name[6:]) if family == "torch" else name in optimfx.__all__
        if available:
            out[name] = Contender(name, family, settings, lambda p, make=make: make(optimfx, p))
    return out


def select_contenders(names: Iterable[str] | None = None) -> list[Contender]:
    """Contenders for implementation names (``"AdaX:compiled"`` races ``AdaX``); ``None``: all.

    Names that are not race contenders are left out.
    """
    contenders = all_contenders()
    if names is None:
        return list(contenders.values())
    wanted = {name.split(":", 1)[0] for name in names}
    return [c for c in contenders.values() if c.name in wanted]


def resolve(names: Iterable[str] | None) -> tuple[list[Impl], list[Contender]]:
    """What to time and what to race for the names of ``optimfx bench --optimizers``.

    A name may be an implementation (``"AdaX:compiled"``), an optimizer (``"AdaX"``: its auto
    backend, and its race), a torch baseline (``"torch.Adam"``: every variant) or a wrapper
    (``"Funnel"``: its one implementation, and its race). ``None`` selects the defaults of both.
    Raises ``KeyError`` naming the first name that is neither timed nor raced.
    """
    if names is None:
        return select(), select_contenders()
    impls: list[Impl] = []
    contenders: list[Contender] = []
    for name in names:
        try:
            timed = select([name])
        except KeyError:
            timed = []
        raced = select_contenders([name])
        if not timed and not raced:
            raise KeyError(name)
        impls += [i for i in timed if i.name not in {k.name for k in impls}]
        contenders += [c for c in raced if c.name not in {k.name for k in contenders}]
    return impls, contenders
