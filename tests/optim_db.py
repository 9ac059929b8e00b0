"""The optimizer database every conformance test runs over (torch's ``OptimizerInfo`` idea).

Adding an optimizer to the conformance suite is one ``OptimInfo`` row in ``OPTIMIZERS``: its class,
the keyword cases to run (each with a ``desc``), its construction/step error cases, the backends it
supports, whether it takes complex parameters, its tolerance profile in ``tolerances.py``, and, where
the defaults do not fit it, the keywords the generic tests construct it with. Inputs never set
``backend``: the tests add it, as torch's tests add ``foreach``/``fused``. The errors every optimizer
shares (``common_error_inputs``) are added by the test, not listed per row.

A wrapper that is not built from ``params`` (``EGStepSize(base, ...)``) gets a ``factory`` that is
(:class:`EGAround`), and a ``variant`` naming the composition in test ids. A generic test that cannot
apply to a row is listed in the row's ``skips`` with the reason; ``tests/conformance/conftest.py``
turns it into a skip.
"""

from __future__ import annotations

import re
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
    #: builds the optimizer from ``(params, **keywords)`` where ``cls`` is not built that way (a wrapper)
    factory: Callable[..., torch.optim.Optimizer] | None = None
    #: tells apart, in test ids, rows of one class (the base a wrapper is composed with)
    variant: str = ""
    #: key of the per-parameter step counter in ``state_dict()["state"]`` entries; ``None``: none is kept
    step_key: str | None = "step"
    #: generic tests that cannot apply to this row, by test function name (``"test_errors: <desc>"``
    #: for one of ``common_error_inputs``), each with the reason
    skips: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The optimizer's class name (its ``repr`` starts with it)."""
        return self.cls.__name__

    @property
    def id(self) -> str:
        return f"{self.name}-{self.variant}" if self.variant else self.name

    def make(self, params: Any, backend: str = "reference", **overrides: Any) -> torch.optim.Optimizer:
        """``cls(params, **kwargs, backend=backend, **overrides)`` (``factory`` in place of ``cls``)."""
        return (self.factory or self.cls)(params, **{**self.kwargs, "backend": backend, **overrides})


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
        ErrorInput("unknown bf16_rounding", {"bf16_rounding": "up"}, ValueError,
                   r"^Invalid bf16_rounding: 'up'"),
        ErrorInput("float rounding_seed", {"rounding_seed": 1.5}, ValueError, r"^Invalid rounding_seed: 1\.5"),
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


def adamw_inputs() -> list[OptimInput]:
    # ChildTuning masks with reserve_p < 1 are keyed by the parameter's position in its optimizer,
    # which a state built by hand (test_backends) has not got; tests/kernels/test_child_tuning_masks.py
    # covers them. reserve_p = 1 is the unmasked optimizer.
    return [
        OptimInput("default"),
        OptimInput("weight-decay-betas", {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)}),
        OptimInput("maximize", {"lr": 1e-2, "weight_decay": 1e-2, "maximize": True}),
        OptimInput("official-conventions", {"lr": 1e-2, "eps": 1e-6, "eps_placement": "v",
                                            "decay_order": "alicemind"}),
        OptimInput("no-bias-correction", {"lr": 1e-2, "correct_bias": False, "skip_nonfinite": False}),
        OptimInput("child-tuning-f-reserve-1", {"lr": 1e-2, "child_tuning_mode": "F", "reserve_p": 1.0}),
    ]


def child_tuning_adamw_inputs() -> list[OptimInput]:
    return [
        OptimInput("default"),
        OptimInput("weight-decay", {"lr": 1e-2, "weight_decay": 0.01}),
        OptimInput("torch-conventions", {"lr": 1e-2, "eps_placement": "v_hat", "decay_order": "torch"}),
        OptimInput("mode-f-reserve-1", {"lr": 1e-2, "mode": "ChildTuning-F", "reserve_p": 1.0}),
        OptimInput("mode-d-without-masks", {"lr": 1e-2, "mode": "ChildTuning-D"}),
    ]


def _adamw_errors(mode_key: str) -> list[ErrorInput]:
    return [
        ErrorInput("beta1 = 1", {"betas": (1.0, 0.999)}, ValueError, r"^Invalid betas\[0\]: 1\.0"),
        ErrorInput("beta2 < 0", {"betas": (0.9, -0.1)}, ValueError, r"^Invalid betas\[1\]: -0\.1"),
        ErrorInput("negative eps", {"eps": -1e-8}, ValueError, r"^Invalid eps: -1e-08"),
        ErrorInput("negative weight_decay", {"weight_decay": -0.1}, ValueError, r"^Invalid weight_decay: -0\.1"),
        ErrorInput("unknown eps_placement", {"eps_placement": "inside"}, ValueError,
                   r"^Invalid eps_placement: 'inside'"),
        ErrorInput("unknown decay_order", {"decay_order": "hf"}, ValueError, r"^Invalid decay_order: 'hf'"),
        ErrorInput("unknown mode", {mode_key: "ChildTuning-X"}, ValueError,
                   rf"^Invalid {mode_key}: 'ChildTuning-X'"),
        ErrorInput("reserve_p = 0", {"reserve_p": 0.0}, ValueError, r"^Invalid reserve_p: 0\.0"),
        ErrorInput("reserve_p > 1", {"reserve_p": 1.5}, ValueError, r"^Invalid reserve_p: 1\.5"),
        ErrorInput("float seed", {"seed": 1.0}, ValueError, r"^Invalid seed: 1\.0"),
    ]


# AdaFactor's generic-test keywords: an external lr (relative_step=False), so that the tests' lr
# overrides (schedulers, lr=0, tensor lr) mean what they mean for the other optimizers; the
# inputs below also run the paper's relative step (lr=None).
ADAFACTOR_KWARGS = {"lr": 1e-2, "relative_step": False}
_RELATIVE = {"lr": None, "relative_step": True}


def adafactor_inputs() -> list[OptimInput]:
    # on the generic shapes ((6, 4) and TinyModel's 4 x 4 weights are factored; vectors and 0-d are not)
    return [
        OptimInput("paper-default", _RELATIVE),
        OptimInput("external-lr", {"lr": 1e-3, "relative_step": False, "scale_parameter": False}),
        OptimInput("beta1", {**_RELATIVE, "beta1": 0.9}),
        OptimInput("external-lr-beta1-weight-decay", {"beta1": 0.9, "weight_decay": 0.1}),
        OptimInput("torch-mode", {"lr": 1e-2, "relative_step": True, "eps": (None, 1e-3), "weight_decay": 0.05,
                                  "lr_mode": "rho_max", "eps_mode": "torch", "decay_mode": "torch"}),
        # 5 > min(6, 4) and > 4: every tensor takes the unfactored path
        OptimInput("min-dim-size-to-factor", {"min_dim_size_to_factor": 5}),
        OptimInput("warmup-init", {**_RELATIVE, "warmup_init": True}),
        OptimInput("clip-decay-cap", {"clip_threshold": 1.5, "decay_rate": -0.5, "beta2_cap": 0.6}),
        # below 1 clips harder than the paper's d = 1 (transformers accepts any d > 0)
        OptimInput("clip-below-one", {"clip_threshold": 0.5}),
    ]


def _exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def adafactor_error_inputs() -> list[ErrorInput]:
    def complex_param() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.randn(2, 3, dtype=torch.complex64))]

    return [
        ErrorInput("lr None without relative step", {"lr": None}, ValueError,
                   _exactly("Invalid lr: None (an lr is required when relative_step=False)")),
        ErrorInput("manual lr with relative step", {"relative_step": True}, ValueError,
                   _exactly("Invalid lr: a manual lr cannot be combined with relative_step=True (leave lr=None, "
                            "or pass relative_step=False, or lr_mode='rho_max')")),
        ErrorInput("torch decay of a relative-step multiplier", {**_RELATIVE, "decay_mode": "torch"}, ValueError,
                   _exactly("Invalid decay_mode: 'torch' decays by lr·λ, but with relative_step=True and "
                            "lr_mode='scale' the lr is a multiplier of the relative step; use decay_mode='hf' "
                            "or lr_mode='rho_max'")),
        ErrorInput("warmup_init without relative step", {"warmup_init": True}, ValueError,
                   _exactly("Invalid warmup_init: warmup_init=True requires relative_step=True")),
        ErrorInput("one eps", {"eps": (1e-30,)}, ValueError,
                   _exactly("Invalid eps: (1e-30,) (must be a pair (eps1, eps2))")),
        ErrorInput("eps1 None in paper mode", {"eps": (None, 1e-3)}, ValueError,
                   _exactly("Invalid eps[0]: None is only allowed with eps_mode='torch'")),
        ErrorInput("negative eps1", {"eps": (-1.0, 1e-3)}, ValueError,
                   _exactly("Invalid eps[0]: -1.0 (must be in [0.0, inf])")),
        ErrorInput("negative eps2", {"eps": (1e-30, -1e-3)}, ValueError,
                   _exactly("Invalid eps[1]: -0.001 (must be in [0.0, inf])")),
        ErrorInput("clip_threshold = 0", {"clip_threshold": 0.0}, ValueError,
                   _exactly("Invalid clip_threshold: 0.0 (must be in (0.0, inf])")),
        ErrorInput("decay_rate = 0", {"decay_rate": 0.0}, ValueError,
                   _exactly("Invalid decay_rate: 0.0 (must be in [-inf, 0.0))")),
        ErrorInput("beta1 = 1", {"beta1": 1.0}, ValueError, _exactly("Invalid beta1: 1.0 (must be in [0.0, 1.0))")),
        ErrorInput("negative weight_decay", {"weight_decay": -0.1}, ValueError,
                   _exactly("Invalid weight_decay: -0.1 (must be in [0.0, inf])")),
        ErrorInput("beta2_cap = 1", {"beta2_cap": 1.0}, ValueError,
                   _exactly("Invalid beta2_cap: 1.0 (must be in [0.0, 1.0))")),
        ErrorInput("min_dim_size_to_factor = 0", {"min_dim_size_to_factor": 0}, ValueError,
                   _exactly("Invalid min_dim_size_to_factor: 0 (must be None or a positive int)")),
        ErrorInput("float min_dim_size_to_factor", {"min_dim_size_to_factor": 2.0}, ValueError,
                   _exactly("Invalid min_dim_size_to_factor: 2.0 (must be None or a positive int)")),
        ErrorInput("unknown lr_mode", {"lr_mode": "max"}, ValueError,
                   _exactly("Invalid lr_mode: 'max' (must be one of 'scale', 'rho_max')")),
        ErrorInput("unknown eps_mode", {"eps_mode": "inside"}, ValueError,
                   _exactly("Invalid eps_mode: 'inside' (must be one of 'paper', 'torch')")),
        ErrorInput("unknown decay_mode", {"decay_mode": "fairseq"}, ValueError,
                   _exactly("Invalid decay_mode: 'fairseq' (must be one of 'hf', 'torch')")),
        ErrorInput("complex parameter", {}, RuntimeError,
                   _exactly("AdaFactor does not support complex parameters or gradients"),
                   params=complex_param, on_step=torch.randn_like),
    ]


#: EGStepSize's keywords, its η as ``eg_lr`` (see :class:`EGAround`)
EG_KEYWORDS = ("eg_lr", "momentum", "beta", "gamma_scale", "gamma_gain", "normalize", "scope", "exp_clip",
               "gain_clamp", "skip_nonfinite", "backend")


@dataclass(frozen=True)
class EGAround:
    """``EGStepSize`` around ``base``, built from ``(params, **keywords)`` as every row's optimizer is.

    ``EGStepSize``'s keywords go to it, its η as ``eg_lr``: ``lr`` is the base's, the learning rate
    that schedulers, DCP's init step and the tests' ``lr`` cases drive. The keywords in ``shared`` go
    to the base as well (an optimfx base takes the same ``backend``, so one backend runs the whole
    step); every other keyword goes to the base.
    """

    base: type[torch.optim.Optimizer]
    shared: tuple[str, ...] = ()

    def __call__(self, params: Any, **kwargs: Any) -> optimfx.EGStepSize:
        eg = {key: kwargs.pop(key) for key in EG_KEYWORDS if key in kwargs}
        kwargs.update({key: eg[key] for key in self.shared if key in eg})
        if "eg_lr" in eg:
            eg["lr"] = eg.pop("eg_lr")
        return optimfx.EGStepSize(self.base(params, **kwargs), **eg)


# γ large enough that the scale and gains move visibly within the suite's few steps
_EG_KWARGS = {"lr": 1e-2, "gamma_scale": 0.3, "gamma_gain": 0.1}
# over the convergence problems' 100-400 steps those γ let the scale run away (on SGD, e^{0.3} per step
# of agreeing gradients, until it diverges); the library defaults, γ = 1e-2, are what a long run uses
_EG_LONG_RUN = {"gamma_scale": 1e-2, "gamma_gain": 1e-2}


def eg_adax_inputs() -> list[OptimInput]:
    return [
        OptimInput("default"),
        # raw dot products: γ in units of 1/gradient² (unit-scale test gradients, tensors of ≤ 24 elements)
        OptimInput("group-scope-raw", {"scope": "group", "normalize": False, "gamma_scale": 0.05,
                                       "gamma_gain": 0.05}),
        OptimInput("global-scope-momentum", {"scope": "global", "momentum": 0.5, "eg_lr": 0.5}),
        # clamps that bind from the second step on
        OptimInput("clamps-bind", {"gamma_gain": 5.0, "exp_clip": 0.05, "gain_clamp": (0.95, 1.05)}),
        OptimInput("maximize", {"maximize": True, "weight_decay": 1e-2}),
        OptimInput("no-gains-no-skip", {"gamma_gain": 0.0, "beta": 0.5, "skip_nonfinite": False}),
    ]


def eg_sgd_inputs() -> list[OptimInput]:
    return [
        OptimInput("default"),
        OptimInput("weight-decay-maximize", {"weight_decay": 1e-2, "maximize": True}),
        OptimInput("global-scope-raw", {"scope": "global", "normalize": False, "gamma_scale": 0.05}),
        OptimInput("no-momentum-clamps-bind", {"momentum": 0.0, "gamma_gain": 5.0, "exp_clip": 0.05,
                                               "gain_clamp": (0.95, 1.05)}),
    ]


def eg_error_inputs() -> list[ErrorInput]:
    """EGStepSize's own checks (``eg_lr`` is its ``lr``, η)."""
    return [
        ErrorInput("negative eta", {"eg_lr": -1.0}, ValueError, _exactly("Invalid lr: -1.0 (must be in [0.0, inf])")),
        ErrorInput("momentum = 1", {"momentum": 1.0}, ValueError,
                   _exactly("Invalid momentum: 1.0 (must be in [0.0, 1.0))")),
        ErrorInput("beta < 0", {"beta": -0.1}, ValueError, _exactly("Invalid beta: -0.1 (must be in [0.0, 1.0))")),
        ErrorInput("beta = 1", {"beta": 1.0}, ValueError, _exactly("Invalid beta: 1.0 (must be in [0.0, 1.0))")),
        ErrorInput("negative gamma_scale", {"gamma_scale": -1.0}, ValueError,
                   _exactly("Invalid gamma_scale: -1.0 (must be in [0.0, inf])")),
        ErrorInput("nan gamma_gain", {"gamma_gain": float("nan")}, ValueError,
                   _exactly("Invalid gamma_gain: nan (must be in [0.0, inf])")),
        ErrorInput("unknown scope", {"scope": "layer"}, ValueError,
                   _exactly("Invalid scope: 'layer' (must be one of 'tensor', 'group', 'global')")),
        ErrorInput("negative exp_clip", {"exp_clip": -1.0}, ValueError,
                   _exactly("Invalid exp_clip: -1.0 (must be in [0.0, inf])")),
        ErrorInput("one gain bound", {"gain_clamp": (1e-3,)}, ValueError,
                   _exactly("Invalid gain_clamp: (0.001,) (must be a pair (min, max), either may be None)")),
        ErrorInput("negative gain min", {"gain_clamp": (-1.0, 10.0)}, ValueError,
                   _exactly("Invalid gain_clamp[0]: -1.0 (must be in [0.0, inf])")),
        ErrorInput("zero gain max", {"gain_clamp": (None, 0.0)}, ValueError,
                   _exactly("Invalid gain_clamp[1]: 0.0 (must be in (0.0, inf])")),
        ErrorInput("gain min above max", {"gain_clamp": (2.0, 1.0)}, ValueError,
                   _exactly("Invalid gain_clamp: (2.0, 1.0) (min must not exceed max)")),
        ErrorInput("compiled backend", {"backend": "compiled"}, ValueError,
                   _exactly("Invalid backend: 'compiled' (must be one of 'auto', 'reference', 'triton')")),
    ]


_EG_SKIPS = {
    "test_reference_backend_runs_the_algorithms_reference_step":
        "EGStepSize has no Algorithm whose reference_step could be driven by hand: it wraps its base's "
        "step(); its reference is checked against the spec's worked example (tests/composition/test_eg_wrapper.py)",
    "test_step_hooks_fire_once_in_torch_order":
        "the base's step() is a torch.optim step of its own, so the global step hooks fire for it too "
        "(twice per EGStepSize step); EGStepSize's own hooks fire once",
}

OPTIMIZERS: list[OptimInfo] = [
    OptimInfo(optimfx.AdaX, adax_inputs, adax_error_inputs),
    OptimInfo(optimfx.AdaXW, adax_inputs, adax_error_inputs),
    # β2 = 0.999 averages the squared gradient over ~1000 steps: too slow to follow Rosenbrock's valley
    # within the test's 400 steps; 0.99 converges there
    OptimInfo(optimfx.AdamW, adamw_inputs, lambda: _adamw_errors("child_tuning_mode"),
              convergence={"rosenbrock": {"betas": (0.9, 0.99)}}),
    OptimInfo(optimfx.ChildTuningAdamW, child_tuning_adamw_inputs, lambda: _adamw_errors("mode"),
              convergence={"rosenbrock": {"betas": (0.9, 0.99)}}),
    # the step is shape-dependent (factored row/column statistics), so complex parameters are refused
    # rather than optimised as their real view. Convergence: without the parameter scale (x starts at
    # 0 on the quadratic, where RMS(x)·lr would crawl); Rosenbrock's curved valley needs momentum
    # (without it the clipped, sign-like steps stall at 0.45 of the start distance after 400 steps).
    OptimInfo(optimfx.AdaFactor, adafactor_inputs, adafactor_error_inputs, supports_complex=False,
              kwargs=ADAFACTOR_KWARGS,
              convergence={"quadratic": {"lr": 0.05, "scale_parameter": False},
                           "rosenbrock": {"lr": 0.1, "scale_parameter": False, "beta1": 0.9}}),
    # EG around an optimfx optimizer: one backend for both (EG has no compiled backend)
    OptimInfo(optimfx.EGStepSize, eg_adax_inputs, eg_error_inputs, backends=("reference", "triton"),
              kwargs=_EG_KWARGS, factory=EGAround(optimfx.AdaX, shared=("backend", "skip_nonfinite")),
              variant="AdaX", step_key="base/step", skips=_EG_SKIPS,
              convergence={"quadratic": _EG_LONG_RUN, "rosenbrock": _EG_LONG_RUN}),
    # the paper's setting (Funnel): plain SGD, EG's velocity as the momentum. Neither keeps a step counter.
    OptimInfo(optimfx.EGStepSize, eg_sgd_inputs, eg_error_inputs, backends=("reference", "triton"),
              kwargs={**_EG_KWARGS, "momentum": 0.9}, factory=EGAround(torch.optim.SGD), variant="SGD",
              step_key=None,
              # Rosenbrock's gradients reach ~10³ at the start: SGD needs a small lr there (0.3 diverges)
              convergence={"quadratic": _EG_LONG_RUN, "rosenbrock": {**_EG_LONG_RUN, "lr": 1e-3}},
              skips={**_EG_SKIPS,
                     "test_state_dict_with_python_number_step_loads_and_steps":
                         "neither torch.optim.SGD (without momentum) nor EGStepSize keeps a step counter",
                     "test_complex_param_equals_its_real_view":
                         "torch.optim.SGD rounds the step of a complex parameter and of its real view differently "
                         "(1 ulp), which reaches EG's d and velocity; EG's own part is exact (the AdaX row)",
                     "test_state_dict_from_before_an_option_existed_loads":
                         "torch.optim.SGD does not fill its own group options missing from a checkpoint "
                         "(KeyError 'momentum' in torch alone); EG fills its own (the AdaX row)",
                     "test_errors: negative lr": "lr is torch.optim.SGD's, which words it 'Invalid learning rate'",
                     "test_errors: nan lr": "lr is torch.optim.SGD's, which accepts nan",
                     "test_errors: unknown bf16_rounding": "bf16_rounding is an option of optimfx's optimizers; "
                                                           "torch.optim.SGD has none",
                     "test_errors: float rounding_seed": "rounding_seed is an option of optimfx's optimizers; "
                                                         "torch.optim.SGD has none"}),
]


def _backend_marks(backend: str) -> list[pytest.MarkDecorator]:
    if backend == "triton":
        return [pytest.mark.skipif(not optimfx.triton_available(), reason="Triton is not installed")]
    return []


def rows() -> list[Any]:
    """``pytest.param(row)`` for every optimizer, for ``@pytest.mark.parametrize("row", rows())``."""
    return [pytest.param(r, id=r.id) for r in OPTIMIZERS]


def rows_x_backends(backends: tuple[str, ...] = ("reference", "triton")) -> list[Any]:
    """``pytest.param(row, backend)`` for every optimizer and every backend it supports among
    ``backends``. Most tests skip "compiled" (each new graph costs seconds); the tests that make the
    compiled backend's claims (parity with the reference, state_dict round trip) pass it."""
    return [pytest.param(r, b, id=f"{r.id}-{b}", marks=_backend_marks(b))
            for r in OPTIMIZERS for b in backends if b in r.backends]


def rows_x_inputs(backends: tuple[str, ...] = ("reference", "triton")) -> list[Any]:
    """``pytest.param(row, backend, input)`` for every optimizer, backend and keyword case."""
    return [pytest.param(r, b, i, id=f"{r.id}-{b}-{i.desc}", marks=_backend_marks(b))
            for r in OPTIMIZERS for b in backends if b in r.backends for i in r.inputs()]
