"""Fixtures of the reference-backend tests."""

from __future__ import annotations

import pytest
import torch

from optimfx._kernels import cpu_adafactor, cpu_adam, cpu_build
from optimfx.reference import aten_fused


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """The number of tensors of every fused-kernel call, in order: ATen's fused Adam kernel, and
    the C kernel that steps masked groups (``optimfx._kernels.cpu_adam``)."""
    calls: list[int] = []

    def counting(fn):
        def counted(params, *args, **kwargs):
            calls.append(len(params))
            return fn(params, *args, **kwargs)
        return counted

    for name in ("_fused_adam_", "_fused_adamw_"):
        monkeypatch.setattr(torch, name, counting(getattr(torch, name)))
    monkeypatch.setattr(cpu_adam, "step", counting(cpu_adam.step))
    return calls


@pytest.fixture
def without_cpu_kernel(monkeypatch) -> None:
    """Masked groups take ATen ops and ATen's fused Adam kernel, as where no C compiler is found."""
    monkeypatch.setattr(aten_fused, "_step_in_cpu_kernel", lambda *args: False)


@pytest.fixture(params=["cpu-kernel", "aten-masks"])
def masked_path(request, monkeypatch) -> str:
    """Each way a masked group can be stepped on CPU: the C kernel (skipped where it cannot be
    built) and ATen ops plus ATen's fused Adam kernel."""
    if request.param == "cpu-kernel" and not cpu_adam.available():
        pytest.skip(f"CPU kernels unavailable: {cpu_build.unavailable_reason('cpu_adam')}")
    if request.param == "aten-masks":
        monkeypatch.setattr(aten_fused, "_step_in_cpu_kernel", lambda *args: False)
    return request.param


@pytest.fixture
def without_adafactor_kernel(monkeypatch) -> None:
    """AdaFactor's groups take the stacked and per-tensor reference steps, as where no C compiler is
    found (``optimfx/reference/adafactor_cpu.py``)."""
    monkeypatch.setattr(cpu_adafactor, "available", lambda: False)
