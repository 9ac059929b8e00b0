"""ChildTuning-F/D on the default CPU path against the plain-PyTorch masks, interleaved in one process.

The default CPU path of ``AdamW`` and ``AdaXW`` computes the masks inside the update loop, in the C
kernel ``optimfx._kernels.cpu_adam`` (built on first use); without a C compiler it masks a group's
gradients a batch of equal-length segments at a time (``optimfx/reference/batched_masks.py``) and
steps each batch through ATen's fused Adam kernel. Contenders, each on its own copy of the preset's
parameters and gradients, timed round-robin (medians; ratios to the unmasked step of the same
optimizer):

* ``<opt> off``: no masks (ATen's fused Adam kernel);
* ``<opt> F``, ``<opt> D``: ChildTuning-F (``reserve_p=0.3``) and D (30 % masks on every tensor with
  ``ndim ≥ 2``) at their defaults;
* ``<opt> F batched masks``, ``<opt> D batched masks``: the same without the C kernel;
* ``<opt> F per-tensor masks``, ``<opt> D per-tensor masks``: each tensor masked on its own
  (:func:`optimfx.reference.child_tuning.mask_grad`, a fresh result per tensor) and one ATen call
  for the group.

Every contender takes :data:`WARMUP_STEPS` untimed steps first (F-masked second moments start at
zero, and torch's CPU ``sqrt`` is several times slower on zeros).

Usage::

    python -m benches.child_tuning_cpu --rounds 12 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from typing import Any, Callable, Iterator

import torch

import optimfx
from optimfx.reference import aten_fused
from optimfx.reference import child_tuning as ct

from .adafactor_cpu import PRESETS, report, time_preset

RESERVE_P = 0.3
WARMUP_STEPS = 20
Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _per_tensor_masked_step(params, grads, states, args, mask, step) -> None:
    """One kernel call for the group after masking every tensor on its own."""
    masked = [ct.mask_grad(g, s, mask) for g, s in zip(grads, states)]
    aten_fused._call(params, masked, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], args)


@contextlib.contextmanager
def _patched(name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    original = getattr(aten_fused, name)
    setattr(aten_fused, name, replacement)
    try:
        yield
    finally:
        setattr(aten_fused, name, original)


def patched_step(cls: type, suffix: str, name: str, replacement: Callable[..., Any]) -> type:
    """``cls`` whose steps run with ``aten_fused.<name>`` replaced."""
    def step(self: Any, closure: Any = None) -> Any:
        with _patched(name, replacement):
            return cls.step(self, closure)

    return type(f"{cls.__name__}{suffix}", (cls,), {"step": step})


def per_tensor_masks(cls: type) -> type:
    """``cls`` whose steps mask tensor by tensor."""
    return patched_step(cls, "PerTensorMasks", "_step_masked", _per_tensor_masked_step)


def batched_masks(cls: type) -> type:
    """``cls`` whose steps mask with ATen ops a batch at a time (no C kernel)."""
    return patched_step(cls, "BatchedMasks", "_step_in_cpu_kernel", lambda *args: False)


def _factory(cls: type, mode: str, backend: str = "auto") -> Factory:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        kwargs = {} if mode == "off" else dict(child_tuning_mode=mode, reserve_p=RESERVE_P)
        opt = cls(params, backend=backend, **kwargs)
        if mode == "D":
            gen = torch.Generator().manual_seed(0)
            opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < RESERVE_P for p in params if p.ndim >= 2})
        return opt

    return make


def contenders(compiled: bool = False) -> dict[str, Factory]:
    """Each optimizer unmasked, F and D (batched and per-tensor masks); with ``compiled``, AdamW's three
    on ``backend="compiled"`` too (its first steps compile, before the timed rounds)."""
    out: dict[str, Factory] = {}
    for cls in (optimfx.AdamW, optimfx.AdaXW):
        name = cls.__name__
        out[f"{name} off"] = _factory(cls, "off")
        for mode in ("F", "D"):
            out[f"{name} {mode}"] = _factory(cls, mode)
            out[f"{name} {mode} batched masks"] = _factory(batched_masks(cls), mode)
            out[f"{name} {mode} per-tensor masks"] = _factory(per_tensor_masks(cls), mode)
        if compiled and cls is optimfx.AdamW:
            for mode in ("off", "F", "D"):
                out[f"{name} {mode} compiled"] = _factory(cls, mode, "compiled")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the presets (smoke runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--compiled", action="store_true", help="also AdamW on backend='compiled'")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"torch": torch.__version__, "optimfx": optimfx.__version__,
                               "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "rounds": args.rounds, "presets": {}}
    for preset in args.presets.split(","):
        seconds = time_preset(preset, contenders(args.compiled), args.rounds, args.scale, WARMUP_STEPS)
        results["presets"][preset] = seconds
        for opt in ("AdamW", "AdaXW"):
            print(report(preset, {k: v for k, v in seconds.items() if k.startswith(opt + " ")}, f"{opt} off"))
            print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
