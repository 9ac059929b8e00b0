"""Fixtures of the reference-backend tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """The number of tensors of every fused-kernel call, in order."""
    calls: list[int] = []
    for name in ("_fused_adam_", "_fused_adamw_"):
        op = getattr(torch, name)

        def counted(params, *args, _op=op, **kwargs):
            calls.append(len(params))
            return _op(params, *args, **kwargs)

        monkeypatch.setattr(torch, name, counted)
    return calls
