"""Hyperparameter checks shared by every optimizer.

Each helper raises :class:`ValueError` whose message starts with the argument's name, so a user who
mistypes ``betas=(0.9, 1.1)`` reads ``Invalid betas[1]: 1.1 (must be in [0, 1))``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping

import torch

_BACKENDS = ("auto", "reference", "triton", "compiled")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value.detach().cpu().reshape(()))
    # numbers.Real: Python and numpy scalars alike (np.float32, np.int64), as torch.optim takes them
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number)")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """Return ``value`` as a float after checking it lies in the interval ``low .. high``."""
    x = _as_float(name, value)
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if math.isnan(x) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {x} (must be in {left}{low}, {high}{right})")
    return x


def check_nonnegative(name: str, value: Any) -> float:
    return check_range(name, value, 0.0, math.inf)


def check_positive(name: str, value: Any) -> float:
    return check_range(name, value, 0.0, math.inf, low_open=True)


def check_lr(value: Any) -> None:
    """``lr`` may be a non-negative float or a 1-element tensor (for compiled steps)."""
    check_nonnegative("lr", value)


def check_betas(value: Any, ranges: tuple[tuple[float, float, bool, bool], ...]) -> tuple[float, ...]:
    """Check a ``betas`` tuple element by element; ``ranges`` holds (low, high, low_open, high_open)."""
    if not isinstance(value, (tuple, list)) or len(value) != len(ranges):
        raise ValueError(f"Invalid betas: {value!r} (must be a tuple of {len(ranges)} numbers)")
    return tuple(
        check_range(f"betas[{i}]", v, lo, hi, low_open=lo_open, high_open=hi_open)
        for i, (v, (lo, hi, lo_open, hi_open)) in enumerate(zip(value, ranges))
    )


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {', '.join(map(repr, choices))})")
    return value


def check_backend(value: Any) -> str:
    return check_choice("backend", value, _BACKENDS)


def apply_checks(values: dict[str, Any], checks: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """Run ``checks[key]`` on every ``values[key]`` it names, in place, storing what each returns (the
    checked value, normalised); ``values`` is returned. The one place a constructor's defaults and
    a param group's own values are checked, so both are checked alike."""
    for key, check in checks.items():
        if key in values:
            values[key] = check(values[key])
    return values


#: torch.optim flags for variants optimfx does not implement, with what a user should know
_UNSUPPORTED_TORCH_FLAGS = {
    "amsgrad": "optimfx has no AMSGrad variant",
    "capturable": "CUDA-graph capture of the step is not supported; the Triton step never waits on the GPU",
    "differentiable": "optimfx steps run under torch.no_grad and cannot be differentiated through",
}


def check_torch_flags(**flags: Any) -> None:
    """Accept ``torch.optim``'s implementation flags so that a ``torch.optim`` call runs unchanged.

    ``foreach`` and ``fused`` choose among torch's own implementations; optimfx picks its fused path
    itself (``backend``), so they are checked (``None`` or a bool) and otherwise ignored. ``amsgrad``,
    ``capturable`` and ``differentiable`` must stay ``False``: optimfx has none of those variants, and
    a silent plain step in their place would be a different optimizer.
    """
    for name, value in flags.items():
        if name in ("foreach", "fused"):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r} (must be None, True or False)")
        elif name in _UNSUPPORTED_TORCH_FLAGS:
            if value:
                raise ValueError(f"Invalid {name}: {value!r} ({_UNSUPPORTED_TORCH_FLAGS[name]})")
        else:
            raise TypeError(f"unexpected keyword argument {name!r}")


#: Param-group keys that one family of optimizers always writes, with the family. A checkpoint whose
#: groups hold one that the loading optimizer neither has nor accepts was written by that family: its
#: state (``exp_avg_sq`` of Adam read as AdaX's long-term memory, ...) would be read as another
#: algorithm's. Only names no one is likely to give a key of their own are here (not ``rho``,
#: ``alpha`` or ``momentum``, which users and wrappers such as SAM put in groups): keys a user adds
#: load as torch.optim loads them.
FAMILY_KEYS: dict[str, str] = {
    **dict.fromkeys(("amsgrad", "decoupled_weight_decay"), "torch.optim.Adam/AdamW"),
    **dict.fromkeys(("dampening", "nesterov"), "torch.optim.SGD"),
    "centered": "torch.optim.RMSprop",
    **dict.fromkeys(("lr_decay", "initial_accumulator_value"), "torch.optim.Adagrad"),
    "momentum_decay": "torch.optim.NAdam",
    **dict.fromkeys(("etas", "step_sizes"), "torch.optim.Rprop"),
    **dict.fromkeys(("max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size",
                     "line_search_fn"), "torch.optim.LBFGS"),
    "beta2_decay": "torch.optim.Adafactor",
    **dict.fromkeys(("bias_correction", "adam_w_mode"), "apex/DeepSpeed FusedAdam"),
    **dict.fromkeys(("correct_bias", "decay_order", "eps_placement"), "optimfx.AdamW"),
    "decoupled": "optimfx.AdaX/AdaXW",
    **dict.fromkeys(("clip_threshold", "relative_step", "scale_parameter", "warmup_init", "beta2_cap", "lr_mode",
                     "min_dim_size_to_factor", "decay_mode"), "Adafactor (optimfx, transformers)"),
}

#: Per-parameter state keys of other optimizers (none is an optimfx optimizer's, once
#: ``torch.optim.Adafactor``'s are translated), with the optimizer: a checkpoint whose groups betray
#: nothing (``torch.optim.Adamax``'s, say) is found by its state.
FAMILY_STATE_KEYS: dict[str, str] = {
    "exp_inf": "torch.optim.Adamax",
    "momentum_buffer": "torch.optim.SGD",
    "square_avg": "torch.optim.RMSprop/Adadelta",
    "acc_delta": "torch.optim.Adadelta",
    "mu_product": "torch.optim.NAdam",
    "ax": "torch.optim.ASGD",
    **dict.fromkeys(("row_var", "col_var"), "torch.optim.Adafactor"),
}


def check_loaded_groups(owner: str, state_dict: dict[str, Any], own_keys: Iterable[str] = (),
                        accepted: Iterable[str] = ()) -> None:
    """Refuse a checkpoint written by another optimizer instead of continuing as another algorithm.

    * a variant optimfx does not implement (``amsgrad=True``: its ``max_exp_avg_sq`` would be loaded
      and never read);
    * a group holding a key of another family (:data:`FAMILY_KEYS`) that is not one of ``own_keys``
      (the loading optimizer's group keys) or ``accepted`` (keys of checkpoints it reads as its own,
      e.g. ``torch.optim.AdamW``'s in ``optimfx.AdamW``);
    * a parameter's state holding another optimizer's key (:data:`FAMILY_STATE_KEYS`).

    A checkpoint whose groups and state hold only keys every Adam-type optimizer writes
    (``torch.optim.SparseAdam``'s) cannot be told apart and loads.
    """
    allowed = set(own_keys) | set(accepted)
    for i, group in enumerate(state_dict["param_groups"]):
        for name, why in _UNSUPPORTED_TORCH_FLAGS.items():
            if group.get(name):
                raise ValueError(f"{owner}.load_state_dict: the checkpoint's param group has {name}=True "
                                 f"({why}); it was written by another optimizer")
        foreign = sorted(k for k in group if k in FAMILY_KEYS and k not in allowed)
        if foreign:
            _refuse(owner, f"param group {i} of the checkpoint has {', '.join(map(repr, foreign))}",
                    FAMILY_KEYS[foreign[0]])
    for entry in state_dict["state"].values():
        foreign = sorted(k for k in entry if k in FAMILY_STATE_KEYS) if isinstance(entry, dict) else []
        if foreign:
            _refuse(owner, f"the checkpoint's state has {', '.join(map(repr, foreign))}",
                    FAMILY_STATE_KEYS[foreign[0]])


def _refuse(owner: str, what: str, family: str) -> None:
    raise ValueError(f"{owner}.load_state_dict: {what}, written by {family}, not {owner}: its state would be read "
                     f"as {owner}'s. Load it into the optimizer that wrote it, or start {owner} from a fresh "
                     "state (load only the model's weights)")
