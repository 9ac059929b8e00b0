"""The reference backend as plain PyTorch, for tests that compare a fast path with it.

On CPU the reference backend steps fp32 tensors through faster paths of its own: ATen's fused Adam
kernel (AdamW, AdaX), optimfx's C kernels (AdaFactor's step, ChildTuning masks, EG's passes). Each
of those is tested against the plain-PyTorch step in ``tests/reference`` and ``tests/kernels/test_cpu_*``;
a Triton or compiled run is compared with the plain step itself, never only with another fast path.
"""

from __future__ import annotations

import pytest

from optimfx._kernels import cpu_adafactor, cpu_adam, cpu_eg
from optimfx.reference import aten_fused


def use_plain_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch every CPU fast path of the reference backend off (until ``monkeypatch`` is undone)."""
    for module in (cpu_adafactor, cpu_adam, cpu_eg, aten_fused):
        monkeypatch.setattr(module, "available", lambda: False)
