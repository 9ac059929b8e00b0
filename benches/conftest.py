"""Fixtures of the step benchmarks: the device, the smoke-run scale and the in-process roof.

``pytest benches`` runs at full size. ``pytest benches --benchmark-disable`` is a smoke run: each
benchmark steps once, presets shrink to ``SMOKE_SCALE`` (unless ``OPTIMFX_BENCH_SCALE`` is set) and
compiled backends are skipped. ``OPTIMFX_BENCH_DEVICE`` picks the device (default: CUDA when
available, else CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from . import presets
from .roofline import suite_roof


def _smoke(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


def pytest_configure(config: pytest.Config) -> None:
    if presets.ENV_SCALE is None and _smoke(config):
        presets.set_scale(presets.SMOKE_SCALE)


@pytest.fixture(scope="session")
def smoke(request: pytest.FixtureRequest) -> bool:
    return _smoke(request.config)


@pytest.fixture(scope="session")
def device() -> torch.device:
    name = os.environ.get("OPTIMFX_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def roof(device: torch.device):
    """Measured once per session, before the first benchmark, in this process."""
    return suite_roof(device)
