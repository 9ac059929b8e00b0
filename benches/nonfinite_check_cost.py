"""What the default non-finite guard costs: ``skip_nonfinite=True`` against ``False``, side by side.

With ``skip_nonfinite=True`` (the default) a Triton step first reads every gradient once to decide,
on the device, whether the whole step must be skipped (a step is all or nothing, so the decision
has to come before the first parameter is written); the update kernels then read that flag. That
is one extra read of the gradients, 4 of 32 bytes per fp32 parameter for Adam-type updates, which
``torch.optim.Adam(fused=True)`` does not pay (it checks nothing without a GradScaler). With a
``GradScaler`` the scaler's ``found_inf`` is used instead and no scan runs.

    python -m benches.nonfinite_check_cost [N_PARAMS] [ROUNDS]     (defaults: 500M on CUDA, 10M on CPU; 10)

Prints medians of interleaved rounds (:func:`optimfx.bench.timing.run_interleaved`).
"""

from __future__ import annotations

import sys

import torch

import optimfx
from optimfx.bench.presets import get_preset, scale_for
from optimfx.bench.registry import BENCH_LR, Impl, one_pass_bytes, select
from optimfx.bench.timing import run_interleaved
from optimfx.cli import _count as parse_count


def _available(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _impl(name: str, skip_nonfinite: bool) -> Impl:
    cls = getattr(optimfx, name)
    label = "guarded" if skip_nonfinite else "unguarded"
    return Impl(f"{name}:{label}", "optimfx",
                lambda ps: cls(ps, lr=BENCH_LR, skip_nonfinite=skip_nonfinite), one_pass_bytes, _available)


def main(argv: list[str]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_params = parse_count(argv[0]) if argv else (500_000_000 if device.type == "cuda" else 10_000_000)
    rounds = int(argv[1]) if len(argv) > 1 else 10
    preset = get_preset("transformer-50m")
    preset = preset.scaled(scale_for(preset, n_params))
    impls = [_impl(n, guard) for n in ("AdamW", "AdaX") for guard in (True, False)]
    impls += select(["torch.Adam:fused"] if device.type == "cuda" else ["torch.Adam:single"])
    results = run_interleaved(impls, preset, device, steps=rounds)
    print(f"{preset.numel:,} params ({len(preset.shapes)} tensors) on {device}, {rounds} interleaved rounds")
    print("| implementation | median ms |")
    print("|---|---:|")
    for r in results:
        print(f"| {r.name} | {r.median_s * 1e3:.3f} |" if r.ok else f"| {r.name} | {r.error} |")


if __name__ == "__main__":
    main(sys.argv[1:])
