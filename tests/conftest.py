"""Shared pytest setup: Triton's CPU interpreter when there is no GPU, seeding, and devices.

``TRITON_INTERPRET`` must be set before the first import of a Triton kernel module, so it is set
here, at collection time; importing torch alone does not import any kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Tests run against the installed package (``pip install -e .``), never the checkout's top level:
# ``python -m pytest`` puts the repository root first on ``sys.path``, where the ``kernels/`` source
# folder (installed as ``optimfx._kernels``) would shadow the PyPI package ``kernels`` (Hugging Face's
# kernel hub, a dependency of recent ``transformers``, whose model code imports it).
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same global RNG state, so reruns are bit-identical."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """CPU always; CUDA when available."""
    return torch.device(request.param)
