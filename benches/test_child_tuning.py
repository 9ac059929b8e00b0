"""ChildTuning-F/D steps against the same optimizer without masks and against ``torch.optim.AdamW``.

pytest-benchmark, one table per preset (as ``test_step.py``): ``AdamW`` / ``AdaXW`` / ``AdaFactor``
with ``backend="auto"`` (the reference on CPU, Triton on CUDA), each without masks, in F mode
(``reserve_p=0.3``) and in D mode (30 % masks on every tensor with ``ndim ≥ 2``, as the official
recipe masks the Transformer blocks only), and ``torch.optim.AdamW``'s default path.

Full run:  ``pytest benches/test_child_tuning.py --benchmark-json=out.json``
Smoke run: ``pytest benches/test_child_tuning.py --benchmark-disable``

pytest-benchmark runs one implementation after the other; for ratios that the machine's noise does
not skew, time the same implementations interleaved (round-robin, medians)::

    python -m benches.test_child_tuning [PRESET] [ROUNDS]
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import pytest
import torch

import optimfx
from optimfx.bench.registry import BENCH_KWARGS, BENCH_LR, MULTI_PASS_BYTES, Impl, one_pass_bytes
from optimfx.bench.timing import prepare, run_interleaved, synchronize

from . import presets

ROUNDS = int(os.environ.get("OPTIMFX_BENCH_ROUNDS", "15"))
#: masks keep this fraction (F: per step, D: fixed)
RESERVE_P = 0.3
#: masked variants: constructor keywords, and whether D masks are set after construction
MODES: dict[str, dict[str, Any]] = {"off": {}, "F": dict(child_tuning_mode="F", reserve_p=RESERVE_P, seed=0),
                                    "D": dict(child_tuning_mode="D")}
OPTIMIZERS = ("AdamW", "AdaXW", "AdaFactor")
#: untimed steps first: an F-masked entry never kept so far still has a zero second moment (a
#: fraction (1 − p)^t after t steps), and torch's CPU sqrt is several times slower on zeros, so the
#: first steps are not the steady state (D masks keep their zeros for good: that is the D regime)
WARMUP_STEPS = 20


def _d_masks(params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {p: (torch.rand(p.shape, generator=gen) < RESERVE_P).to(p.device) for p in params if p.ndim >= 2}


def _available(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _optimfx_impl(name: str, mode: str) -> Impl:
    cls = getattr(optimfx, name)

    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        opt = cls(params, lr=BENCH_LR, **BENCH_KWARGS.get(name, {}), **MODES[mode])
        if mode == "D":
            opt.set_gradient_mask(_d_masks(params))
        return opt

    return Impl(f"{name}:{mode}", "optimfx", factory, MULTI_PASS_BYTES.get(cls.algorithm.name, one_pass_bytes),
                _available, warmup_steps=WARMUP_STEPS)


def _torch_adamw() -> Impl:
    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=BENCH_LR)

    return Impl("torch.AdamW:default", "torch", factory, one_pass_bytes, _available, warmup_steps=WARMUP_STEPS)


CASES: list[Impl] = [_optimfx_impl(n, m) for n in OPTIMIZERS for m in MODES] + [_torch_adamw()]


@pytest.mark.parametrize("impl", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("preset_name", presets.BENCH_PRESETS)
def test_child_tuning_step(benchmark, preset_name, impl, device, smoke):
    prep = prepare(impl, presets.preset(preset_name), device, torch.float32, warmup_steps=1 if smoke else None)
    step: Callable[[], Any] = prep.optimizer.step
    if device.type == "cuda":
        def step() -> None:
            prep.optimizer.step()
            synchronize(device)

    group = f"child-tuning {preset_name}"
    benchmark.group = f"{group} x{presets.scale():g}" if presets.scale() != 1 else group
    benchmark.extra_info.update(implementation=impl.name, preset=preset_name, scale=presets.scale(),
                                params=prep.n_params, tensors=len(prep.params), device=str(device),
                                backend=prep.backend, bytes_per_param=prep.bytes_per_param,
                                state_bytes=prep.state_bytes)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    for p in prep.params:
        assert torch.isfinite(p).all(), f"{impl.name} produced non-finite parameters"


def main(argv: list[str] | None = None) -> None:
    """Interleaved medians of every case on one preset, as ratios to the same optimizer without masks."""
    argv = sys.argv[1:] if argv is None else argv
    preset_name = argv[0] if argv else "matrices"
    rounds = int(argv[1]) if len(argv) > 1 else 15
    device = torch.device(os.environ.get("OPTIMFX_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {r.name: r for r in run_interleaved(CASES, presets.preset(preset_name), device, steps=rounds)}
    torch_ms = results["torch.AdamW:default"].median_s * 1e3
    print(f"{preset_name} on {device}, {rounds} interleaved rounds, medians")
    print("| implementation | median ms | vs same optimizer without masks | vs torch.optim.AdamW |")
    print("|---|---:|---:|---:|")
    for name, result in results.items():
        if not result.ok:
            print(f"| {name} | {result.error} | | |")
            continue
        base = results.get(f"{name.split(':')[0]}:off")
        ms = result.median_s * 1e3
        vs_off = f"{ms / (base.median_s * 1e3):.3f}" if base is not None and base.ok else ""
        print(f"| {name} | {ms:.1f} | {vs_off} | {ms / torch_ms:.3f} |")


if __name__ == "__main__":
    main()
