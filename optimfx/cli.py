"""The ``optimfx`` command.

``optimfx bench`` (also plain ``optimfx``) times one optimizer step of every optimfx optimizer
against ``torch.optim.Adam`` (single-tensor, foreach, fused) on one device, interleaving the
implementations round-robin and reporting medians, and prints ms/step, the speedup over
``torch.optim.Adam``'s default path, effective GB/s, the fraction of an in-place bandwidth roof
measured in the same process, and optimizer state bytes per parameter.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

import torch

from . import __version__

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
#: Default workload per device type: ``(preset, params)``; ``None`` keeps the preset's own size.
#: On CPU a 20 M-parameter transformer layout (~2.6 GB for 8 implementations) takes ~25 s on a quiet
#: 2-core VM and ~80 s on a busy one.
DEFAULT_WORKLOAD = {"cpu": ("transformer-50m", 20_000_000), "cuda": ("transformer-50m", None)}


def _count(text: str) -> int:
    """``"50M"``, ``"2.5e6"``, ``"200k"`` or ``"1000000"`` -> a positive int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb]?)\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (examples: 20M, 2.5e6, 500k)")
    value = round(float(m.group(1)) * _SUFFIX[m.group(2)])
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (must be at least 1)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value {text!r}") from None
    if value < 3:
        raise argparse.ArgumentTypeError(f"{value} is too few steps for a median (use at least 3)")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"invalid device {text!r} (examples: cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device type {device.type!r} (use cpu or cuda)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def build_parser() -> argparse.ArgumentParser:
    from .bench.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="optimfx", description="optimfx command line tools. With no command, runs 'bench'.")
    parser.add_argument("--version", action="version", version=f"optimfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser(
        "bench", help="time optimizer steps against torch.optim.Adam",
        description="Time one step of every optimfx optimizer against torch.optim.Adam "
                    "(single-tensor, foreach, fused), interleaved round-robin, and report medians.",
        epilog="presets: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    bench.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="parameter-shape preset (default: transformer-50m)")
    bench.add_argument("--params", type=_count, default=None, metavar="N",
                       help="total parameters; the preset's shapes are scaled to about N "
                            "(e.g. 20M, 2.5e6; default: 20M on CPU, the preset's size on CUDA)")
    bench.add_argument("--optimizers", default=None, metavar="LIST",
                       help="comma-separated implementations (see --list); a bare optimizer name "
                            "means its auto backend, 'torch.Adam' the three torch variants "
                            "(default: every optimfx optimizer and the torch.Adam variants). "
                            "torch.optim.Adam's default path is always added as the baseline.")
    bench.add_argument("--device", type=_device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    bench.add_argument("--dtype", choices=list(_DTYPES), default="float32",
                       help="parameter dtype (default: float32)")
    bench.add_argument("--steps", type=_steps, default=20, metavar="N",
                       help="timed rounds; every implementation steps once per round (default: 20)")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="write a JSON report into this folder")
    bench.add_argument("--roof-mib", type=_positive_int, default=None, metavar="MIB",
                       help="footprint of the roof's two buffers in MiB (default: 8x the L3 size on "
                            "CPU, 10x the L2 size on CUDA)")
    bench.add_argument("--list", action="store_true", help="list the implementations and exit")
    bench.set_defaults(handler=_bench, parser=bench)
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from .bench import registry, report, roofline, timing
    from .bench.presets import get_preset, scale_for

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype]
    if args.list:
        impls = list(registry.all_impls().values())
        width = max(len(i.name) for i in impls)
        for impl in impls:
            why = impl.unavailable(device, dtype)
            flags = ("default" if impl.default else "") + (f"unavailable: {why}" if why else "")
            print(f"{impl.name:{width}s}  {flags}".rstrip())
        return 0
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"argument --out: {args.out!r} exists and is not a folder")
    baseline = registry.torch_adam_default(device)
    names = None
    if args.optimizers is not None:
        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        if not names:
            parser.error("argument --optimizers: empty list")
    try:
        impls = registry.select(names)
    except KeyError as err:
        known = ", ".join(registry.all_impls())
        parser.error(f"argument --optimizers: unknown implementation {err.args[0]!r} (choose from {known})")
    if baseline not in [i.name for i in impls]:
        impls.insert(0, registry.all_impls()[baseline])

    default_preset, default_params = DEFAULT_WORKLOAD[device.type]
    preset = get_preset(args.preset or default_preset)
    n_params = args.params if args.params is not None else (
        default_params if args.preset is None else None)
    scale = 1.0 if n_params is None else scale_for(preset, n_params)
    shapes = preset.scaled(scale)

    env = report.environment(device)
    _log(f"optimfx {__version__} | torch {env['torch']} | {env['device_name']} ({device}) | "
         f"{torch.get_num_threads()} threads")
    _log(f"workload: {preset.name} scaled x{scale:.3g} -> {shapes.numel:,} params in "
         f"{len(shapes.shapes)} tensors, {args.dtype}")
    roof_bytes = None if args.roof_mib is None else args.roof_mib * 2**20
    _log("measuring the roof")
    roof = roofline.measure_roof(device, roof_bytes)
    results = timing.run_interleaved(impls, shapes, device, dtype, steps=args.steps, log=_log)
    _log("measuring the roof again")
    roof = roofline.merge(roof, roofline.measure_roof(device, roof_bytes))
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    table = report.rows(results, baseline, roof)
    print(f"optimfx bench: {shapes.numel:,} params ({preset.name} x{scale:.3g}, {len(shapes.shapes)} "
          f"tensors, {args.dtype}) on {env['device_name']} ({device}), median of {args.steps} "
          "interleaved steps")
    print()
    print(report.format_table(table, baseline, roof))
    if args.out is not None:
        path = report.write_json({
            "environment": env,
            "workload": {"preset": preset.name, "description": preset.description,
                         "scale": scale, "n_params": shapes.numel, "n_tensors": len(shapes.shapes),
                         "dtype": args.dtype, "steps": args.steps},
            "baseline": baseline, "roof": roof.to_dict(), "results": table,
        }, args.out)
        print(f"\nreport written to {path}")
    return 0 if any(r.ok for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optimfx`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in ("bench", "-h", "--help", "--version"):
        argv = ["bench", *argv]
    args, extra = parser.parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.handler(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
