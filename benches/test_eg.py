"""EGStepSize around Adam, AdamW and AdaX against the base alone and ``torch.optim.Adam``, timed with
pytest-benchmark, one table per preset (the conventions of ``test_step.py``).

Each base appears alone and wrapped, with the default backend of both (``auto``: the reference on
CPU, Triton on CUDA), so a table reads as "what EG costs on top of its base". The byte model of a
wrapped base (:func:`_eg_bytes`) counts EG's passes per fp32 parameter: on GPU the base's one-pass
bytes plus 60 (``kernels/eg.py``: alignment pass and saved copy, then the apply pass); on CPU plus 64
(``kernels/cpu_eg.c``: sums 12, adapt 28, apply 24), or, around optimfx's AdamW/AdaX, whose step runs
inside EG's pass, 64 in all (sums 12, one pass 52); around a plain SGD base, which EG steps itself,
48 in all (sums 12, one pass 36).

Full run:  ``pytest benches/test_eg.py --benchmark-json=eg.json``
Smoke run: ``pytest benches/test_eg.py --benchmark-disable``
Side-by-side ratios, interleaved in one process: :func:`optimfx.bench.timing.run_interleaved` over
:data:`CASES` (see the module's ``__main__``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import optimfx
from optimfx.bench.registry import BENCH_LR, Impl, one_pass_bytes, torch_adam_default
from optimfx.bench.timing import prepare, run_interleaved, synchronize

from . import presets

ROUNDS = int(os.environ.get("OPTIMFX_BENCH_ROUNDS", "15"))
#: bytes per fp32 parameter EG's passes move besides the base's step: GPU (``kernels/eg.py``), CPU
#: (``kernels/cpu_eg.c``)
EG_BYTES = {"cuda": 60.0, "cpu": 64.0}
#: the whole step per fp32 parameter where EG takes the base's step (optimfx's AdamW/AdaX on CPU)
#: or forms it (a plain SGD base)
EG_WITH_ADAM_BYTES = 64.0
EG_DIRECT_BYTES = 48.0

BASES = {
    "torch.Adam": lambda ps: torch.optim.Adam(ps, lr=BENCH_LR),
    "AdamW": lambda ps: optimfx.AdamW(ps, lr=BENCH_LR),
    "AdaX": lambda ps: optimfx.AdaX(ps, lr=BENCH_LR),
    # a plain SGD base (Funnel's): EG forms its step itself, the base does not step
    "torch.SGD": lambda ps: torch.optim.SGD(ps, lr=BENCH_LR),
}


def _available(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype == torch.float32 else "the EG benchmarks are fp32"


def _eg_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    base, device = optimizer.base, params[0].device.type
    if type(base) is torch.optim.SGD:
        return EG_DIRECT_BYTES
    if device == "cpu" and isinstance(base, (optimfx.AdamW, optimfx.AdaX)):
        return EG_WITH_ADAM_BYTES
    return one_pass_bytes(base, params) + EG_BYTES.get(device, EG_BYTES["cuda"])


def _cases() -> list[Impl]:
    out = []
    for name, make in BASES.items():
        out.append(Impl(f"{name}:auto", "torch" if name.startswith("torch") else "optimfx", make, one_pass_bytes,
                        _available))
        # family "wrapper": its groups hold ``eg_backend``, not the ``backend`` key timing reads
        out.append(Impl(f"EG({name}):auto", "wrapper", lambda ps, make=make: optimfx.EGStepSize(make(ps)),
                        _eg_bytes, _available))
    return out


CASES = _cases()


@pytest.mark.parametrize("impl", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("preset_name", presets.BENCH_PRESETS)
def test_eg_step(benchmark, preset_name, impl, device):
    prep = prepare(impl, presets.preset(preset_name), device, torch.float32)

    def step() -> None:
        prep.optimizer.step()
        synchronize(device)

    benchmark.group = f"eg {preset_name} x{presets.scale():g}"
    benchmark.extra_info.update(implementation=impl.name, preset=preset_name, scale=presets.scale(),
                                params=prep.n_params, device=str(device),
                                torch_default=torch_adam_default(device), bytes_per_param=prep.bytes_per_param)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    for p in prep.params:
        assert torch.isfinite(p).all(), f"{impl.name} produced non-finite parameters"
    if benchmark.stats is not None:
        benchmark.extra_info["effective_gbps"] = prep.n_params * prep.bytes_per_param / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":  # python -m benches.test_eg PRESET SCALE [ROUNDS]: interleaved ratios
    preset = optimfx.bench.presets.get_preset(sys.argv[1], float(sys.argv[2]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {r.name: r for r in run_interleaved(CASES, preset, device,
                                                  steps=int(sys.argv[3]) if len(sys.argv) > 3 else 10)}
    adam = results["torch.Adam:auto"].median_s
    for name, base in BASES.items():
        alone, wrapped = results[f"{name}:auto"], results[f"EG({name}):auto"]
        print(f"{sys.argv[1]} x{sys.argv[2]} {name:10s} base {alone.median_s * 1e3:8.1f} ms  "
              f"EG {wrapped.median_s * 1e3:8.1f} ms  EG/base {wrapped.median_s / alone.median_s:5.2f}  "
              f"EG/torch.Adam {wrapped.median_s / adam:5.2f}")
