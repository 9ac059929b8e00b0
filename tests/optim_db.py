"""The optimizer database every conformance test runs over (torch's ``OptimizerInfo`` idea).

Adding an optimizer to the conformance suite is one ``OptimInfo`` row in ``OPTIMIZERS``: its class,
the keyword cases to run (each with a ``desc``), its construction/step error cases, the backends it
supports, whether it takes complex parameters, its tolerance profile in ``tolerances.py``, and, where
the defaults do not fit it, the keywords the generic tests construct it with. Inputs never set
``backend``: the tests add it, as torch's tests add ``foreach``/``fused``. The errors every optimizer
shares (``common_error_inputs``) are added by the test, not listed per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import optimfx

BACKENDS = ("reference", "triton", "compiled")


@dataclass(frozen=True)
class OptimInput:
    """Keyword arguments for the constructor (never ``backend``), with a short description."""

    desc: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorInput:
    """A bad construction (or step) and the error it must raise; ``regex`` names the argument.

    ``params`` builds the ``params`` argument (default: one fresh 3-element parameter); with
    ``on_step`` the constructor must succeed and ``on_step(param)`` sets a gradient whose ``step()``
    must raise.
    """

    desc: str
    kwargs: dict[str, Any]
    error_type: type[Exception]
    regex: str
    params: Callable[[], Any] | None = None
    on_step: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer. ``kwargs`` are the constructor keywords every generic test starts from (tests
    override single keys, e.g. ``lr`` or ``maximize``); ``tolerance`` is a profile of ``tolerances.py``;
    ``convergence`` overrides, per problem of ``test_convergence.py``, its constructor keywords."""

    cls: type[torch.optim.Optimizer]
    inputs: Callable[[], list[OptimInput]]
    error_inputs: Callable[[], list[ErrorInput]]
    backends: tuple[str, ...] = BACKENDS
    supports_complex: bool = True
    tolerance: str = "pointwise"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-2})
    convergence: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def make(self, params: Any, backend: str = "reference", **overrides: Any) -> torch.optim.Optimizer:
        """``cls(params, **kwargs, backend=backend, **overrides)``."""
        return self.cls(params, **{**self.kwargs, "backend": backend, **overrides})


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(3))


def common_error_inputs() -> list[ErrorInput]:
    """Errors every optimizer raises, from ``torch.optim.Optimizer`` or the optimfx base class."""
    shared = _param()
    return [
        ErrorInput("bare tensor", {}, TypeError, r"params argument given to the optimizer should be "
                   r"an iterable of Tensors or dicts", params=lambda: torch.randn(3, requires_grad=True)),
        ErrorInput("empty params", {}, ValueError, r"empty parameter list", params=list),
        ErrorInput("param in two groups", {}, ValueError, r"more than one parameter group",
                   params=lambda: [{"params": [shared]}, {"params": [shared]}]),
        ErrorInput("non-leaf param", {}, ValueError, r"non-leaf Tensor",
                   params=lambda: [_param() * 2]),
        ErrorInput("negative lr", {"lr": -1.0}, ValueError, r"^Invalid lr: -1\.0"),
        ErrorInput("nan lr", {"lr": float("nan")}, ValueError, r"^Invalid lr: nan"),
        ErrorInput("2-element tensor lr", {"lr": torch.tensor([1e-3, 1e-3])}, ValueError,
                   r"^Tensor lr must be 1-element"),
        ErrorInput("unknown backend", {"backend": "cuda"}, ValueError, r"^Invalid backend: 'cuda'"),
        ErrorInput("sparse gradient", {}, RuntimeError, r"does not support sparse gradients",
                   on_step=lambda p: torch.zeros_like(p).to_sparse()),
    ]


def adax_inputs() -> list[OptimInput]:
    # lr stays at or below 1e-2 so 5 fp32 steps fit tolerances.py's "pointwise" profile
    return [
        OptimInput("default"),
        OptimInput("lr-weight-decay", {"lr": 1e-2, "weight_decay": 1e-2}),
        OptimInput("maximize", {"lr": 1e-2, "weight_decay": 1e-2, "maximize": True}),
        # eps large enough that each eps_mode changes the numbers at unit-scale gradients
        OptimInput("eps-official", {"lr": 1e-2, "eps": 1e-3}),
        OptimInput("eps-adam", {"lr": 1e-2, "eps": 1e-3, "eps_mode": "adam"}),
        OptimInput("eps-inside-no-decay", {"lr": 1e-2, "eps": 1e-3, "eps_mode": "inside",
                                           "weight_decay": 0.0}),
        OptimInput("betas", {"lr": 1e-2, "betas": (0.5, 1e-2), "skip_nonfinite": False}),
    ]


def adax_error_inputs() -> list[ErrorInput]:
    return [
        ErrorInput("beta1 = 1", {"betas": (1.0, 1e-4)}, ValueError, r"^Invalid betas\[0\]: 1\.0"),
        ErrorInput("beta1 < 0", {"betas": (-0.1, 1e-4)}, ValueError, r"^Invalid betas\[0\]: -0\.1"),
        ErrorInput("beta2 = 0", {"betas": (0.9, 0.0)}, ValueError, r"^Invalid betas\[1\]: 0\.0"),
        ErrorInput("one beta", {"betas": (0.9,)}, ValueError, r"^Invalid betas: \(0\.9,\)"),
        ErrorInput("eps = 0", {"eps": 0.0}, ValueError, r"^Invalid eps: 0\.0"),
        ErrorInput("negative weight_decay", {"weight_decay": -0.1}, ValueError,
                   r"^Invalid weight_decay: -0\.1"),
        ErrorInput("unknown eps_mode", {"eps_mode": "outside"}, ValueError,
                   r"^Invalid eps_mode: 'outside'"),
    ]


OPTIMIZERS: list[OptimInfo] = [
    OptimInfo(optimfx.AdaX, adax_inputs, adax_error_inputs),
    OptimInfo(optimfx.AdaXW, adax_inputs, adax_error_inputs),
]


def _backend_marks(backend: str) -> list[pytest.MarkDecorator]:
    if backend == "triton":
        return [pytest.mark.skipif(not optimfx.triton_available(), reason="Triton is not installed")]
    return []


def rows() -> list[Any]:
    """``pytest.param(row)`` for every optimizer, for ``@pytest.mark.parametrize("row", rows())``."""
    return [pytest.param(r, id=r.name) for r in OPTIMIZERS]


def rows_x_backends(backends: tuple[str, ...] = ("reference", "triton")) -> list[Any]:
    """``pytest.param(row, backend)`` for every optimizer and every backend it supports among
    ``backends``. Most tests skip "compiled" (each new graph costs seconds); the tests that make the
    compiled backend's claims (parity with the reference, state_dict round trip) pass it."""
    return [pytest.param(r, b, id=f"{r.name}-{b}", marks=_backend_marks(b))
            for r in OPTIMIZERS for b in backends if b in r.backends]


def rows_x_inputs(backends: tuple[str, ...] = ("reference", "triton")) -> list[Any]:
    """``pytest.param(row, backend, input)`` for every optimizer, backend and keyword case."""
    return [pytest.param(r, b, i, id=f"{r.name}-{b}-{i.desc}", marks=_backend_marks(b))
            for r in OPTIMIZERS for b in backends if b in r.backends for i in r.inputs()]
