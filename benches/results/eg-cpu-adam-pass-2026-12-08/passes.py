"""Per-pass times of EG around optimfx.AdamW on CPU: each cpu_eg call timed around the kernel,
medians over 15 steps, and the base step alone (python benches/results/eg-cpu-adam-pass-2026-12-08/passes.py PRESET)."""
import statistics
import sys
import time

import torch

import optimfx
from optimfx._kernels import cpu_eg
from optimfx.bench import presets
from optimfx.bench.timing import make_params

preset = presets.get_preset(sys.argv[1], 1.0)
times: dict[str, list[float]] = {}
for name in ("alignment_parts", "adam_step"):
    def timed(*a, _f=getattr(cpu_eg, name), _n=name, **k):
        t = time.perf_counter()
        out = _f(*a, **k)
        times.setdefault(_n, []).append(time.perf_counter() - t)
        return out
    setattr(cpu_eg, name, timed)
params = make_params(preset, torch.device("cpu"), torch.float32, seed=0)
base_alone = optimfx.AdamW(make_params(preset, torch.device("cpu"), torch.float32, seed=0), lr=1e-3)
opt = optimfx.EGStepSize(optimfx.AdamW(params, lr=1e-3))
step_times: dict[str, list[float]] = {"EG step": [], "AdamW step alone": []}
for i in range(18):
    for label, o in (("EG step", opt), ("AdamW step alone", base_alone)):
        t = time.perf_counter()
        o.step()
        if i >= 3:
            step_times[label].append(time.perf_counter() - t)
n = sum(p.numel() for p in params)
for name, ts in {**{k: v[3:] for k, v in times.items()}, **step_times}.items():
    print(f"{sys.argv[1]}: {name:18s} {statistics.median(ts) * 1e3:7.1f} ms")
