"""AdaFactor's default CPU path against its peers, interleaved in one process.

Times one ``step()`` of each contender, round-robin (each round in a rotated order), every contender
on its own copy of the same parameters and gradients, and reports medians and the ratio of each
contender's median to that of ``optimfx.AdaFactor``:

* ``optimfx``: ``optimfx.AdaFactor(params)`` (the default: relative step, ``backend="auto"``, which is
  the reference backend on CPU, its C kernel for fp32 tensors), also with ``skip_nonfinite=False``
  (the share of the inf/NaN check) and ``without C kernel`` (plain PyTorch, as without a compiler);
* ``optimfx@<ref>``: the same, with the reference step of git revision ``<ref>`` (``--base``; read
  with ``git show``), the before/after comparison;
* ``transformers``: ``transformers.optimization.Adafactor(params)`` (its defaults: the same paper
  algorithm);
* ``torch:single`` / ``torch:foreach``: ``torch.optim.Adafactor(params)`` (its default, the for-loop)
  and with ``foreach=True`` (its defaults: ``lr=1e-2`` caps the same relative step).

Usage::

    python -m benches.adafactor_cpu --rounds 15 --base HEAD --json out.json

Timings on a shared machine are noisy: compare ratios from one run, not medians across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

import optimfx
from optimfx._algorithm import Algorithm
from optimfx.bench.presets import get_preset, make_params
from optimfx.bench.timing import quantile
from optimfx.reference import adafactor as adafactor_ref
from optimfx.reference.stacking import step_stacks

PRESETS = ("transformer-50m", "many-small", "matrices")
Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _reference_at(ref: str) -> Any:
    """``optimfx/reference/adafactor.py`` as of git revision ``ref``, imported inside ``optimfx.reference``."""
    source = subprocess.run(["git", "show", f"{ref}:optimfx/reference/adafactor.py"], check=True,
                            capture_output=True, text=True).stdout
    name = f"optimfx.reference._adafactor_at_{abs(hash(ref))}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "optimfx.reference"
    sys.modules[name] = module
    exec(compile(source, f"{ref}:optimfx/reference/adafactor.py", "exec"), module.__dict__)
    return module


def _optimizer_at(ref: str) -> type:
    """``optimfx.AdaFactor`` running the reference step of revision ``ref``."""
    mod = _reference_at(ref)
    algorithm = Algorithm(name="adafactor", init_state=mod.init_state, hyper=mod.AdaFactorHyper.from_group,
                          scalars=mod.host_scalars, reference_step=mod.step_)
    return type(f"AdaFactorAt{ref}", (optimfx.AdaFactor,), {"algorithm": algorithm})


def _optimizer_without_c_kernel() -> type:
    """``optimfx.AdaFactor`` stepping in plain PyTorch (stacks of small tensors, then tensor by
    tensor), as where no C compiler is found."""
    algorithm = dataclasses.replace(
        optimfx.AdaFactor.algorithm, group_step_checks_finite=False,
        group_step=functools.partial(step_stacks, functools.partial(adafactor_ref.step_, stacked=True)))
    return type("AdaFactorPlainPyTorch", (optimfx.AdaFactor,), {"algorithm": algorithm})


def contenders(base: str | None) -> dict[str, Factory]:
    plain = _optimizer_without_c_kernel()
    out: dict[str, Factory] = {
        "optimfx": lambda ps: optimfx.AdaFactor(ps),
        "optimfx skip_nonfinite=False": lambda ps: optimfx.AdaFactor(ps, skip_nonfinite=False),
        "optimfx without C kernel": lambda ps: plain(ps),
    }
    if base is not None:
        cls = _optimizer_at(base)
        out[f"optimfx@{base}"] = lambda ps: cls(ps)
    try:
        from transformers.optimization import Adafactor as HFAdafactor
    except ImportError:
        print("transformers is not installed: its Adafactor is left out", file=sys.stderr)
    else:
        out["transformers"] = lambda ps: HFAdafactor(ps)
    out["torch:single"] = lambda ps: torch.optim.Adafactor(ps)
    out["torch:foreach"] = lambda ps: torch.optim.Adafactor(ps, foreach=True)
    return out


def time_preset(preset: str, factories: dict[str, Factory], rounds: int, scale: float,
                warmup_steps: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, list[float]]:
    """Seconds per step of every contender over ``rounds`` interleaved rounds, after ``warmup_steps``
    untimed steps each (the first makes the lazy state), on parameters and gradients of ``dtype``."""
    shapes = get_preset(preset, scale)
    optimizers = {}
    for name, make in factories.items():
        opt = make(make_params(shapes, dtype=dtype))
        for _ in range(warmup_steps):
            opt.step()
        optimizers[name] = opt
    names = list(optimizers)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            optimizers[name].step()
            seconds[name].append(time.perf_counter() - t0)
    for opt in optimizers.values():
        for group in opt.param_groups:
            assert all(torch.isfinite(p).all() for p in group["params"]), "non-finite parameters"
    return seconds


def report(preset: str, seconds: dict[str, list[float]], baseline: str = "optimfx") -> str:
    """A markdown table of the medians and of each contender's median over ``baseline``'s."""
    shapes = get_preset(preset)
    ours = statistics.median(seconds[baseline])
    lines = [f"### {preset} ({len(shapes.shapes)} tensors)", "",
             f"| contender | median ms | p20–p80 ms | time / {baseline} time |", "|---|---:|---:|---:|"]
    for name, xs in seconds.items():
        m = statistics.median(xs)
        lines.append(f"| {name} | {m * 1e3:.1f} | {quantile(xs, .2) * 1e3:.1f}–{quantile(xs, .8) * 1e3:.1f} "
                     f"| {m / ours:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the presets (smoke runs)")
    parser.add_argument("--base", default=None, help="git revision whose reference step to compare with")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameters' and gradients' dtype")
    parser.add_argument("--json", default=None, help="write the raw step times here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    factories = contenders(args.base)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{args.dtype} parameters")
    raw: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
                           "dtype": args.dtype,
                           "base": args.base, "presets": {}}
    for preset in args.presets.split(","):
        seconds = time_preset(preset, factories, args.rounds, args.scale, dtype=getattr(torch, args.dtype))
        raw["presets"][preset] = seconds
        print(report(preset, seconds), end="\n\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
