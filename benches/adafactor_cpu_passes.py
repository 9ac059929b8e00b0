"""Time each pass of AdaFactor's C kernel on CPU, unmasked and with ChildTuning-F/D masks.

``optimfx.AdaFactor`` (defaults, the C kernel of ``optimfx._kernels.cpu_adafactor``) steps a preset's
fp32 parameters three ways, each on its own copy of the parameters and gradients: without masks,
ChildTuning-F (``reserve_p=0.3``) and D (30 % masks on every tensor with ``ndim ≥ 2``). The modes
take turns step by step (round-robin); each pass's wall time is taken around its kernel call, and the
whole step around ``step()`` (the rest is Python: plans, checks, keys). Medians over the rounds, with
each mode's ratio to the unmasked step.

Usage::

    python -m benches.adafactor_cpu_passes [--presets transformer-50m matrices many-small] [--rounds 20]
                                           [--scale 1.0] [--json times.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

import optimfx
from optimfx._kernels import cpu_adafactor
from optimfx.bench.presets import get_preset, make_params

RESERVE_P = 0.3
WARMUP_STEPS = 5
MODES = {"off": {}, "F": dict(child_tuning_mode="F", reserve_p=RESERVE_P, seed=0), "D": dict(child_tuning_mode="D")}


class _PassClock:
    """Wraps the launcher the kernel module calls: the seconds of each pass number of the last step."""

    def __init__(self, launcher):
        self._launcher = launcher
        self.seconds: dict[int, float] = defaultdict(float)

    def run(self, fn, openmp, table, numels, number, *args, **kwargs):
        start = time.perf_counter()
        self._launcher.run(fn, openmp, table, numels, number, *args, **kwargs)
        self.seconds[number] += time.perf_counter() - start


def _optimizer(preset: str, scale: float, mode: str) -> torch.optim.Optimizer:
    params = make_params(get_preset(preset, scale), "cpu", torch.float32)
    opt = optimfx.AdaFactor(params, **MODES[mode])
    if mode == "D":
        gen = torch.Generator().manual_seed(0)
        opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < RESERVE_P for p in params if p.ndim >= 2})
    return opt


def measure(preset: str, rounds: int, scale: float = 1.0) -> dict[str, dict[str, list[float]]]:
    """Seconds per mode and round: ``step`` and ``pass N`` for every pass that ran."""
    if not cpu_adafactor.available():
        raise SystemExit("the AdaFactor C kernel is not available here (no C compiler?)")
    opts = {mode: _optimizer(preset, scale, mode) for mode in MODES}
    clock = _PassClock(cpu_adafactor.cpu_launcher)
    samples: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in MODES}
    cpu_adafactor.cpu_launcher = clock
    try:
        for _ in range(WARMUP_STEPS):
            for opt in opts.values():
                opt.step()
        for k in range(rounds):
            order = list(MODES)[k % len(MODES):] + list(MODES)[:k % len(MODES)]
            for mode in order:
                clock.seconds.clear()
                start = time.perf_counter()
                opts[mode].step()
                samples[mode]["step"].append(time.perf_counter() - start)
                for number, seconds in clock.seconds.items():
                    samples[mode][f"pass {number}"].append(seconds)
    finally:
        cpu_adafactor.cpu_launcher = clock._launcher
    return {m: dict(s) for m, s in samples.items()}


def medians(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}


def report(preset: str, medians: dict[str, dict[str, float]], print_: Callable[[str], None] = print) -> None:
    columns = sorted({k for m in medians.values() for k in m if k != "step"})
    print_(f"{preset}: medians in ms (ratio to the unmasked step)")
    print_("| mode | step | " + " | ".join(columns) + " | rest (Python) |")
    print_("|---|" + "---:|" * (len(columns) + 2))
    off = medians["off"]["step"]
    for mode, m in medians.items():
        passes = [m.get(c, 0.0) for c in columns]
        cells = [f"{1e3 * m['step']:.2f} ({m['step'] / off:.3f})"] + [f"{1e3 * v:.2f}" for v in passes]
        print_(f"| {mode} | " + " | ".join(cells) + f" | {1e3 * (m['step'] - sum(passes)):.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["transformer-50m", "matrices", "many-small"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the presets (smoke runs)")
    parser.add_argument("--json", default=None, help="write the raw times here")
    args = parser.parse_args(argv)
    raw = {}
    for preset in args.presets:
        raw[preset] = measure(preset, args.rounds, args.scale)
        report(preset, medians(raw[preset]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "scale": args.scale, "presets": raw}, f, indent=1)


if __name__ == "__main__":
    main()
