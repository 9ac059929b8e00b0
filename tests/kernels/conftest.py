"""Setup of the kernel tests."""

from __future__ import annotations

import pytest

from plain_reference import use_plain_reference


@pytest.fixture(autouse=True)
def plain_pytorch_reference(request, monkeypatch) -> None:
    """The reference runs these tests compare the Triton kernels with are plain PyTorch
    (``tests/plain_reference.py``): a kernel is never tested only against another fast path. The
    tests of the CPU kernels themselves (``test_cpu_*``, and tests marked ``cpu_fast_paths``) keep
    them on."""
    own_test = request.module.__name__.split(".")[-1].startswith("test_cpu_")
    if not (own_test or request.node.get_closest_marker("cpu_fast_paths")):
        use_plain_reference(monkeypatch)
