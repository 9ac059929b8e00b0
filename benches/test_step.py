"""One optimizer step, timed with pytest-benchmark: optimizer x preset, one table per preset.

Each test builds its optimizer over fresh parameters, takes the warm-up step(s) outside the timed
region (state allocation; compilation for the compiled backend), then times ``optimizer.step``
with ``benchmark.pedantic``. ``extra_info`` carries the byte model, effective GB/s, the fraction of
the roof measured in this process, and the state bytes. Tests of one preset run back to back.

Full run:  ``pytest benches --benchmark-json=out.json``
Smoke run: ``pytest benches --benchmark-disable`` (shrunk presets, one step each, no compile)
Knobs:     ``OPTIMFX_BENCH_SCALE``, ``OPTIMFX_BENCH_OPTIMIZERS``, ``OPTIMFX_BENCH_DEVICE``,
           ``OPTIMFX_BENCH_ROUNDS`` (timed rounds, default 15).
"""

from __future__ import annotations

import os

import pytest
import torch

from optimfx.bench.report import cpu_model
from optimfx.bench.timing import prepare, synchronize

from . import presets
from .registry import CASES, slow_to_warm, torch_adam_default

ROUNDS = int(os.environ.get("OPTIMFX_BENCH_ROUNDS", "15"))
WARMUP_ROUNDS = 1


def _device_name(device: torch.device) -> str:
    """The GPU's model, or the processor's, for the results file (the docs' tables show it)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


# the second decorator is the outer loop: every optimizer of one preset runs back to back
@pytest.mark.parametrize("impl", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("preset_name", presets.BENCH_PRESETS)
def test_step(benchmark, preset_name, impl, device, roof, smoke):
    if smoke and slow_to_warm(impl):
        pytest.skip(f"{impl.name}: compilation is too slow for a smoke run")
    reason = impl.unavailable(device, torch.float32)
    if reason is not None:
        pytest.skip(f"{impl.name} unavailable on {device}: {reason}")
    shapes = presets.preset(preset_name)
    prep = prepare(impl, shapes, device, torch.float32)

    def synced_step() -> None:
        prep.optimizer.step()
        synchronize(device)

    step = synced_step if device.type == "cuda" else prep.optimizer.step

    benchmark.group = f"{preset_name} x{presets.scale():g}" if presets.scale() != 1 else preset_name
    benchmark.extra_info.update(
        implementation=impl.name, preset=preset_name, scale=presets.scale(), params=prep.n_params,
        tensors=len(prep.params),
        device=str(device), device_name=_device_name(device), dtype="float32", backend=prep.backend,
        torch_default=torch_adam_default(device),
        bytes_per_param=prep.bytes_per_param, state_bytes=prep.state_bytes,
        state_bytes_per_param=prep.state_bytes / prep.n_params,
        first_step_ms=prep.first_step_s * 1e3, warmup_ms=prep.warmup_s * 1e3,
        roof_gbps=roof.gbps, roof_kind=roof.rmw.kind, roof_footprint_bytes=roof.rmw.footprint,
    )
    if roof.copy is not None:
        benchmark.extra_info["copy_gbps"] = roof.copy.gbps
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    for p in prep.params:
        assert torch.isfinite(p).all(), f"{impl.name} produced non-finite parameters"
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        gbps = prep.n_params * prep.bytes_per_param / median / 1e9
        benchmark.extra_info.update(effective_gbps=gbps, roof_fraction=gbps / roof.gbps)
