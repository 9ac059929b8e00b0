"""AdaX, AdaXW and AdamW on their default CPU path against ``torch.optim.Adam``, interleaved in one process.

The default CPU path runs fp32 tensors through ATen's fused Adam kernel
(``optimfx/reference/aten_fused.py``). Contenders, each on its own copy of the preset's parameters and
gradients, timed round-robin as in :mod:`benches.adafactor_cpu` (medians; ratios to ``AdaX``):

* ``AdaX``, ``AdaXW``, ``AdamW``: the optimizers at their defaults (``backend="auto"``);
* ``AdaX per-tensor``, ``AdamW per-tensor``: the same with the group step switched off (the
  per-tensor reference, the path before the fused kernel);
* ``AdaX skip_nonfinite=False``: the share of the inf/NaN check;
* ``torch.Adam:single`` (its CPU default), ``torch.Adam:foreach``, ``torch.Adam:fused``.

Usage::

    python -m benches.adam_family_cpu --rounds 15 --json out.json

Timings on a shared machine are noisy: compare ratios from one run, not medians across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from typing import Any

import torch

import optimfx

from .adafactor_cpu import PRESETS, Factory, report, time_preset


def per_tensor(cls: type) -> type:
    """``cls`` with its reference backend's group step switched off."""
    algorithm = dataclasses.replace(cls.algorithm, group_step=None)
    return type(f"{cls.__name__}PerTensor", (cls,), {"algorithm": algorithm})


def contenders() -> dict[str, Factory]:
    adax_per_tensor, adamw_per_tensor = per_tensor(optimfx.AdaX), per_tensor(optimfx.AdamW)
    return {
        "AdaX": lambda ps: optimfx.AdaX(ps),
        "AdaX per-tensor": lambda ps: adax_per_tensor(ps),
        "AdaX skip_nonfinite=False": lambda ps: optimfx.AdaX(ps, skip_nonfinite=False),
        "AdaXW": lambda ps: optimfx.AdaXW(ps),
        "AdamW": lambda ps: optimfx.AdamW(ps),
        "AdamW per-tensor": lambda ps: adamw_per_tensor(ps),
        "torch.Adam:single": lambda ps: torch.optim.Adam(ps, foreach=False),
        "torch.Adam:foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
        "torch.Adam:fused": lambda ps: torch.optim.Adam(ps, fused=True),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the presets (smoke runs)")
    parser.add_argument("--json", default=None, help="write the raw step times here")
    args = parser.parse_args(argv)
    factories = contenders()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    raw: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
                           "presets": {}}
    for preset in args.presets.split(","):
        seconds = time_preset(preset, factories, args.rounds, args.scale)
        raw["presets"][preset] = seconds
        print(report(preset, seconds, baseline="AdaX"), end="\n\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
