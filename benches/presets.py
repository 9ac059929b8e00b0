"""Parameter-shape presets for the step benchmarks, shrunk by ``OPTIMFX_BENCH_SCALE``.

The shapes and the parameter factory live in :mod:`optimfx.bench.presets` (shared with
``optimfx bench``); this module picks the presets the suite runs and applies the suite's scale.

* ``OPTIMFX_BENCH_SCALE``: multiply every preset's leading dimensions (e.g. ``0.01``). Unset, it
  is 1, or :data:`SMOKE_SCALE` when pytest runs with ``--benchmark-disable`` (see conftest.py).
"""

from __future__ import annotations

import os

import torch

from optimfx.bench.presets import PRESETS, Preset, get_preset, make_params

#: Scale of a smoke run (``pytest benches --benchmark-disable``) when the env var is unset.
SMOKE_SCALE = 0.01
#: The env var's value, if set (read once, at import).
ENV_SCALE: float | None = float(os.environ["OPTIMFX_BENCH_SCALE"]) if os.environ.get(
    "OPTIMFX_BENCH_SCALE") else None

#: Presets the suite runs: the transformer-shaped set, many small tensors, few large matrices.
BENCH_PRESETS = ("transformer-50m", "many-small", "matrices")

_scale = ENV_SCALE if ENV_SCALE is not None else 1.0


def set_scale(scale: float) -> None:
    """Called by conftest.py once pytest's options are known."""
    global _scale
    _scale = scale


def scale() -> float:
    return _scale


def preset(name: str) -> Preset:
    """The named preset at the suite's scale."""
    return get_preset(name, _scale)


def params_and_grads(name: str, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Parameters (with ``.grad``) for preset ``name`` at the suite's scale."""
    return make_params(preset(name), device, dtype)


__all__ = ["BENCH_PRESETS", "PRESETS", "SMOKE_SCALE", "params_and_grads", "preset", "scale",
           "set_scale"]
