"""Profile one ``optimfx.AdaFactor`` Triton step on the transformer-50m layout scaled to N parameters.

Usage::

    python -m benches.profile_adafactor [N_PARAMS] [--steps 5] [--warmup W] [--no-adam]

``N_PARAMS`` takes a plain count or a ``k``/``M``/``G`` suffix (default ``500M``). The parameters and
gradients come from :func:`optimfx.bench.presets.make_params` (no external data). After ``W`` warm-up
steps (compilation) it prints:

* the wall time per step (``--steps`` steps between two synchronisations);
* the host-only time of one step: from the call to its return, before synchronising (median over
  the timed steps), i.e. what the CPU spends issuing the launches;
* ``torch.profiler`` over ``--steps`` steps: ``key_averages().table(sort_by="cuda_time_total",
  row_limit=15)``, then each AdaFactor kernel's device time per step and its bandwidth under the
  kernels' byte model (rowcol θ + g, rms g, apply θ + g + θ written: 8, 4, 12 bytes per fp32 element);
* on CUDA, unless ``--no-adam``, the wall time of ``torch.optim.Adam(fused=True)`` on the same
  tensors, for scale.

Without a GPU it runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set here
before any kernel is imported), where only a small size is practical::

    python -m benches.profile_adafactor 200k --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import optimfx
from optimfx.bench.presets import get_preset, make_params, scale_for

PRESET = "transformer-50m"
# bytes per element each tile pass moves (fp32 θ and g, no momentum); stats and scale are small
PASS_BYTES = {"rowcol": 8, "stats": 0, "rms": 4, "scale": 0, "apply": 12}


def _count(text: str) -> int:
    """``"500M"`` → 500 000 000 (suffixes k, M, G; case-insensitive)."""
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if mult != 1 else text) * mult)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_us(evt) -> float:
    """An event's total device time in µs, across torch versions."""
    for name in ("device_time_total", "cuda_time_total"):
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _wall_ms(step, steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_params", nargs="?", default="500M", help="parameter count (default 500M)")
    parser.add_argument("--steps", type=int, default=5, help="profiled (and timed) steps (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--no-adam", action="store_true", help="skip the fused-Adam reference time")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    steps = max(1, args.steps)
    n_target = _count(args.n_params)
    preset = get_preset(PRESET)
    preset = get_preset(PRESET, scale_for(preset, n_target))

    t0 = time.perf_counter()
    params = make_params(preset, device)
    _sync(device)
    n = sum(p.numel() for p in params)
    name = torch.cuda.get_device_name(device) if cuda else "cpu (TRITON_INTERPRET=1)"
    print(f"{PRESET} x{preset.numel / get_preset(PRESET).numel:.3g}: {n / 1e6:.1f} M fp32 params in "
          f"{len(params)} tensors on {name}; torch {torch.__version__}; built in {time.perf_counter() - t0:.1f} s")

    opt = optimfx.AdaFactor(params, lr=1e-3, relative_step=False, backend="triton")
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        opt.step()
    _sync(device)
    print(f"warm-up: {warmup} step(s) in {time.perf_counter() - t0:.1f} s")

    wall = _wall_ms(opt.step, steps, device)
    host = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        host.append((time.perf_counter() - t0) * 1e3)
        _sync(device)
    print(f"AdaFactor wall: {wall:.3f} ms/step (synchronised, {steps} steps)")
    print(f"AdaFactor host-only: {statistics.median(host):.3f} ms/step (median; min {min(host):.3f})")
    print(f"byte model 24 B/param: {24 * n / (wall * 1e-3) / 1e12:.3f} TB/s effective over the wall time")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        _sync(device)
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15))

    if cuda:
        total = 0.0
        print(f"{'kernel':<26}{'ms/step':>10}{'TB/s (model)':>14}")
        for short, nbytes in PASS_BYTES.items():
            us = sum(_device_us(e) for e in averages if e.key == f"adafactor_{short}_kernel") / steps
            total += us
            rate = f"{nbytes * n / (us * 1e-6) / 1e12:.3f}" if nbytes and us else "-"
            print(f"{'adafactor_' + short:<26}{us / 1e3:>10.3f}{rate:>14}")
        print(f"{'all five':<26}{total / 1e3:>10.3f}{24 * n / (total * 1e-6) / 1e12 if total else 0:>14.3f}")

    if cuda and not args.no_adam:
        del opt
        adam = torch.optim.Adam(params, lr=1e-3, fused=True)
        adam.step()
        print(f"torch.optim.Adam(fused=True) wall: {_wall_ms(adam.step, steps, device):.3f} ms/step")


if __name__ == "__main__":
    main()
