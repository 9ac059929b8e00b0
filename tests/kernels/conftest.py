"""Setup of the kernel tests."""

from __future__ import annotations

import pytest

from optimfx._kernels import cpu_adafactor


@pytest.fixture(autouse=True)
def plain_pytorch_reference(monkeypatch) -> None:
    """The reference runs these tests compare the Triton kernels with are plain PyTorch: on CPU the
    reference backend would step AdaFactor's fp32 tensors in its C kernel, and a kernel is never
    tested only against another kernel (``tests/reference/test_adafactor_cpu_kernel.py`` tests the C
    kernel against the same plain-PyTorch step)."""
    monkeypatch.setattr(cpu_adafactor, "available", lambda: False)
