"""Reference bandwidths measured in the benchmark's own process (performance notes §5.4, §7.3).

An optimizer step is an in-place read-modify-write stream, so the CPU roof is an in-place
``a.add_(b, alpha=…)`` (2 reads + 1 write, 12 B per fp32 element) over at least 8× the L3 size: a
plain copy pays a read-for-ownership on every written line and understates what a fused in-place
update can reach. On CUDA both a device-to-device copy (read + write) and the same in-place triad
are measured over at least 10× the L2 size; the triad is the roof reported as "fraction of roof".
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

_FALLBACK_L3 = 32 * 2**20
_MIN_BYTES = 16 * 2**20


@dataclass
class Bandwidth:
    """One bandwidth measurement: bytes counted per repetition, buffer bytes, per-repetition times."""

    kind: str
    nbytes: int
    footprint: int
    seconds: list[float] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        """Median bandwidth in GB/s (1e9 bytes per second)."""
        return self.nbytes / statistics.median(self.seconds) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gbps": self.gbps}


@dataclass
class Roof:
    """The roof an optimizer step is compared with on one device."""

    device: str
    rmw: Bandwidth
    copy: Bandwidth | None = None

    @property
    def gbps(self) -> float:
        return self.rmw.gbps

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "gbps": self.gbps, "rmw": self.rmw.to_dict(),
                "copy": None if self.copy is None else self.copy.to_dict()}


def _cache_size(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip().upper()
    except OSError:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except ValueError:
        return None


def l3_bytes() -> int:
    """Size of the last-level CPU cache (sysfs ``index3``), 32 MiB when it cannot be read."""
    for index in (3, 2):
        size = _cache_size(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        if size:
            return size
    return _FALLBACK_L3


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_cpu_bytes() -> int:
    """Footprint of the CPU roof's two buffers: 8× L3, capped at a quarter of available memory."""
    nbytes = 8 * l3_bytes()
    avail = _available_memory()
    if avail is not None:
        nbytes = min(nbytes, avail // 4)
    return max(nbytes, _MIN_BYTES)


def cpu_rmw(nbytes: int | None = None, reps: int = 10, dtype: torch.dtype = torch.float32) -> Bandwidth:
    """In-place ``a.add_(b, alpha=…)`` on CPU; ``nbytes`` is the footprint of ``a`` and ``b`` together."""
    nbytes = default_cpu_bytes() if nbytes is None else max(int(nbytes), 1024)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = nbytes // (2 * itemsize)
    a = torch.ones(n, dtype=dtype)
    b = torch.ones(n, dtype=dtype)
    a.add_(b, alpha=1e-9)  # first touch and warm-up, not timed
    out = Bandwidth("cpu in-place add_ (2R+1W)", 3 * n * itemsize, 2 * n * itemsize)
    for _ in range(reps):
        t0 = time.perf_counter()
        a.add_(b, alpha=1e-9)
        out.seconds.append(time.perf_counter() - t0)
    return out


def _cuda_timed(fn: Any, reps: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def cuda_roof(device: torch.device | str = "cuda", nbytes: int | None = None, reps: int = 20) -> Roof:
    """Device-to-device copy and in-place triad; ``nbytes`` is the footprint of both buffers."""
    device = torch.device(device)
    if nbytes is None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
        nbytes = max(10 * l2, 512 * 2**20)
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(nbytes, free // 4)
    n = max(int(nbytes), 1024) // 8
    a = torch.ones(n, device=device)
    b = torch.ones(n, device=device)
    copy = Bandwidth("cuda D2D copy_ (1R+1W)", 2 * n * 4, 2 * n * 4,
                     _cuda_timed(lambda: a.copy_(b), reps))
    rmw = Bandwidth("cuda in-place add_ (2R+1W)", 3 * n * 4, 2 * n * 4,
                    _cuda_timed(lambda: a.add_(b, alpha=1e-9), reps))
    return Roof(str(device), rmw, copy)


def measure_roof(device: torch.device | str, nbytes: int | None = None, reps: int | None = None) -> Roof:
    """The roof for ``device``: CPU in-place add, or CUDA copy + in-place triad."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_roof(device, nbytes, reps or 20)
    if device.type != "cpu":
        raise ValueError(f"no roof measurement for device type {device.type!r}")
    return Roof("cpu", cpu_rmw(nbytes, reps or 10))


def merge(a: Roof, b: Roof) -> Roof:
    """Pool the samples of two measurements of the same roof (e.g. before and after a run)."""
    def pool(x: Bandwidth | None, y: Bandwidth | None) -> Bandwidth | None:
        if x is None or y is None:
            return x or y
        return Bandwidth(x.kind, x.nbytes, x.footprint, x.seconds + y.seconds) if x.nbytes == y.nbytes else x
    return Roof(a.device, pool(a.rmw, b.rmw), pool(a.copy, b.copy))
