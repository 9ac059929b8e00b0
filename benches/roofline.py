"""Reference bandwidth for the suite, measured in the benchmark process (performance notes §7.3).

CPU: in-place ``a.add_(b, alpha=…)`` over at least 8× the L3 size, counted as 2 reads + 1 write
(12 B per fp32 element). CUDA: device-to-device copy and in-place triad over at least 10× the L2
size. The measurement code is :mod:`optimfx.bench.roofline`, shared with ``optimfx bench``; this
module only sizes it for the suite (scaled down with the presets in smoke runs).
"""

from __future__ import annotations

import torch

from optimfx.bench.roofline import Roof, default_cpu_bytes, measure_roof

from . import presets


def suite_roof(device: torch.device | str) -> Roof:
    """The roof at full size, or shrunk by the suite's scale (at least 16 MiB) in smoke runs."""
    device = torch.device(device)
    nbytes = None
    if presets.scale() < 1.0:
        full = default_cpu_bytes() if device.type == "cpu" else 512 * 2**20
        nbytes = max(int(full * presets.scale()), 16 * 2**20)
    return measure_roof(device, nbytes)


__all__ = ["Roof", "suite_roof"]
