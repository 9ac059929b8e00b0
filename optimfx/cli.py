"""The ``optimfx`` command.

``optimfx bench`` (also plain ``optimfx`` and ``python -m optimfx``) shows on the user's machine
what optimfx does against ``torch.optim.Adam`` and ``torch.optim.Adafactor``: the step time of every
implementation (interleaved round-robin, medians, effective GB/s, fraction of a bandwidth roof
measured in the same process, state bytes per parameter) and a short convergence race on
scikit-learn's digits; it prints a table and writes a JSON report and a PNG figure. This module
only parses and checks the options; :mod:`optimfx.bench.job` runs the job.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Sequence

import torch

from . import __version__

if TYPE_CHECKING:
    from .bench.job import Plan

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
#: Default workload per device type: ``(preset, params)``; ``None`` keeps the preset's own size.
#: On CPU, 10 M parameters in the transformer layout (160 MB of parameters, gradients and moments
#: per implementation: far beyond the caches, so still the DRAM-bandwidth regime) keep the whole
#: job within about two minutes on a 2-core VM shared with other work: 40 s at a load average of
#: 3.5. With 20 M it took 39 s at a load average of 2.5, but 3.5 minutes at 4 and 13 at 10.
DEFAULT_WORKLOAD = {"cpu": ("transformer-50m", 10_000_000), "cuda": ("transformer-50m", None)}
#: Default step budget of the convergence race: 5 to 25 s for its ten contenders on a 2-core VM.
DEFAULT_RACE_STEPS = 400
#: Default output folder, relative to the working directory.
DEFAULT_OUT = "optimfx-bench"


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


def _race_steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0 (0 skips the race)")
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
        "bench", help="compare optimfx with torch.optim.Adam/Adafactor on this machine",
        description="Time one step of every optimfx optimizer against torch.optim.Adam (single-tensor, "
                    "foreach, fused) and torch.optim.Adafactor, interleaved round-robin, race them "
                    "on scikit-learn's digits, print a table and write a JSON report and a PNG "
                    "figure.",
        epilog="presets: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    size = bench.add_argument_group("step time")
    size.add_argument("--preset", choices=list(PRESETS), default=None,
                      help="parameter-shape preset (default: transformer-50m)")
    size.add_argument("--params", type=_count, default=None, metavar="N",
                      help="total parameters; the preset's shapes are scaled to about N "
                           "(e.g. 20M, 2.5e6; default: 10M on CPU, the preset's size on CUDA)")
    size.add_argument("--dtype", choices=list(_DTYPES), default="float32",
                      help="parameter dtype (default: float32)")
    size.add_argument("--steps", type=_steps, default=20, metavar="N",
                      help="timed rounds; every implementation steps once per round (default: 20)")
    size.add_argument("--roof-mib", type=_positive_int, default=None, metavar="MIB",
                      help="footprint of the roof's two buffers in MiB (default: 8x the L3 size on "
                           "CPU, 10x the L2 size on CUDA)")
    racing = bench.add_argument_group("convergence race")
    racing.add_argument("--race-steps", type=_race_steps, default=DEFAULT_RACE_STEPS, metavar="N",
                      help=f"step budget of every optimizer on the digits MLP; 0 skips the race "
                           f"(default: {DEFAULT_RACE_STEPS})")
    racing.add_argument("--seed", type=int, default=0, help="seed of the race's split, init and batches "
                                                            "(default: 0)")
    bench.add_argument("--optimizers", default=None, metavar="LIST",
                       help="comma-separated names (see --list): an implementation (AdaX:compiled), "
                            "an optimizer (AdaX: its auto backend, and its race), a torch baseline "
                            "(torch.Adam: every variant) or a wrapper (EGStepSize, Funnel, ChildTuning). Default: "
                            "everything marked default. torch.optim.Adam's default path is always "
                            "added as the baseline.")
    bench.add_argument("--device", type=_device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    bench.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help=f"folder for the JSON report and the PNG figure (default: ./{DEFAULT_OUT})")
    bench.add_argument("--no-plot", action="store_true", help="write no PNG figure (no matplotlib needed)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument("--list", action="store_true", help="list what can be timed and raced, and exit")
    bench.set_defaults(handler=_bench, parser=bench)
    return parser


def _list(device: torch.device, dtype: torch.dtype) -> int:
    from .bench import registry

    impls = list(registry.all_impls().values())
    contenders = list(registry.all_contenders().values())
    width = max(len(n) for n in [i.name for i in impls] + [c.name for c in contenders])
    print("timed implementations:")
    for impl in impls:
        why = impl.unavailable(device, dtype)
        flags = ("default" if impl.default else "") + (f"unavailable: {why}" if why else "")
        print(f"  {impl.name:{width}s}  {flags}".rstrip())
    print("race contenders:")
    for contender in contenders:
        print(f"  {contender.name:{width}s}  {contender.settings}")
    return 0


def _chosen_device(args: argparse.Namespace) -> torch.device:
    return args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> "Plan":
    """Check every option and resolve it; errors name the option and exit with status 2."""
    from pathlib import Path

    from .bench import plot, race, registry
    from .bench.job import Plan
    from .bench.presets import get_preset, scale_for

    device = _chosen_device(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {args.out!r} exists and is not a folder")
    names = None
    if args.optimizers is not None:
        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        if not names:
            parser.error("argument --optimizers: empty list")
    try:
        impls, contenders = registry.resolve(names)
    except KeyError as err:
        known = ", ".join([*registry.all_impls(), *registry.all_contenders()])
        parser.error(f"argument --optimizers: unknown name {err.args[0]!r} (choose from {known})")
    baseline = registry.torch_adam_default(device)
    if baseline not in [i.name for i in impls]:
        impls.insert(0, registry.all_impls()[baseline])
    race_config = None
    if args.race_steps > 0:
        if "torch.Adam" not in [c.name for c in contenders]:
            contenders.insert(0, registry.all_contenders()["torch.Adam"])
        missing = race.digits_available()
        if missing is not None:
            parser.error(f"{missing}: the convergence race needs its digits data set "
                         f"({race.INSTALL_HINT}), or pass --race-steps 0")
        race_config = race.RaceConfig(steps=args.race_steps, seed=args.seed)
    if not args.no_plot:
        missing = plot.unavailable()
        if missing is not None:
            parser.error(f"{missing}; or pass --no-plot")

    default_preset, default_params = DEFAULT_WORKLOAD[device.type]
    preset = get_preset(args.preset or default_preset)
    n_params = args.params if args.params is not None else (
        default_params if args.preset is None else None)
    scale = 1.0 if n_params is None else scale_for(preset, n_params)
    return Plan(device=device, dtype=args.dtype, impls=impls, baseline=baseline, preset=preset,
                scale=scale, steps=args.steps, contenders=contenders, race=race_config, out=out,
                roof_bytes=None if args.roof_mib is None else args.roof_mib * 2**20,
                draw=not args.no_plot, show_progress=not args.no_progress)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import job

    if args.list:
        return _list(_chosen_device(args), _DTYPES[args.dtype])
    return job.run(_plan(args, parser))


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
