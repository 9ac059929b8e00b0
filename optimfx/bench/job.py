"""The ``optimfx bench`` job: step times, the convergence race, the table, the JSON report and the figure.

:class:`Plan` is what the command line resolved (every option checked); :func:`run` carries it out:

1. the bandwidth roof (before and after the timing, pooled);
2. the step time of every implementation, interleaved round-robin (:mod:`.timing`);
3. the convergence race on scikit-learn's digits (:mod:`.race`), unless it is switched off;
4. the table on stdout, then ``bench-<device>-<time>.json`` and ``.png`` in the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import plot, race, report, roofline, timing
from .presets import Preset
from .progress import log
from .registry import Contender, Impl


@dataclass(frozen=True)
class Plan:
    """A fully resolved benchmark run."""

    device: torch.device
    dtype: str
    impls: Sequence[Impl]
    baseline: str
    preset: Preset
    scale: float
    steps: int
    contenders: Sequence[Contender]
    race: race.RaceConfig | None
    out: Path | None
    roof_bytes: int | None = None
    draw: bool = True
    show_progress: bool = True

    @property
    def shapes(self) -> Preset:
        return self.preset.scaled(self.scale)


def _race_section(plan: Plan) -> dict[str, Any] | None:
    if plan.race is None or not plan.contenders:
        return None
    cfg = plan.race
    results = race.run_race(plan.contenders, cfg, plan.device, show_progress=plan.show_progress, log=log)
    config = {"dataset": "scikit-learn digits (8x8 images, 10 classes)",
              "model": f"MLP 64-{cfg.hidden}-10 (ReLU)", "steps": cfg.steps,
              "batch_size": cfg.batch_size, "hidden": cfg.hidden, "seed": cfg.seed,
              "test_fraction": cfg.test_fraction, "eval_steps": cfg.eval_steps(), "dtype": "float32",
              "device": str(plan.device)}
    return {"config": config, "results": [r.to_dict() for r in results]}


def _save(plan: Plan, payload: dict[str, Any]) -> None:
    """Write the figure (unless switched off), then the JSON report that names it."""
    assert plan.out is not None
    path = report.report_path(plan.out, str(plan.device))
    payload["files"] = {"json": path.name, "png": None}
    figure = None
    if plan.draw:
        figure = plot.save_figure(payload, path.with_suffix(".png"))
        payload["files"]["png"] = figure.name
    print(f"report written to {report.write_json(payload, plan.out, path)}")
    if figure is not None:
        print(f"figure written to {figure}")


def run(plan: Plan) -> int:
    """Carry out ``plan``; returns the exit status (1 when nothing could be timed)."""
    import optimfx

    device, shapes = plan.device, plan.shapes
    env = report.environment(device)
    log(f"optimfx {optimfx.__version__} | torch {env['torch']} | {env['device_name']} ({device}) | "
        f"{torch.get_num_threads()} threads")
    missing = {k: v for k, v in env.get("cpu_kernels", {}).items() if v != "ready"}
    if missing:
        log(f"CPU kernels not available ({'; '.join(f'{k}: {v}' for k, v in missing.items())}): ChildTuning-masked "
            "and EG steps take the plain-PyTorch path")
    log(f"workload: {plan.preset.name} scaled x{plan.scale:.3g} -> {shapes.numel:,} params in "
        f"{len(shapes.shapes)} tensors, {plan.dtype}")
    log("measuring the roof")
    roof = roofline.measure_roof(device, plan.roof_bytes)
    dtype = getattr(torch, plan.dtype)
    results = timing.run_interleaved(plan.impls, shapes, device, dtype, steps=plan.steps, log=log,
                                     show_progress=plan.show_progress)
    log("measuring the roof again")
    roof = roofline.merge(roof, roofline.measure_roof(device, plan.roof_bytes))
    table = report.rows(results, plan.baseline, roof)
    race_section = _race_section(plan)
    env["loadavg_end"] = report.load_average()

    print(f"optimfx bench: {shapes.numel:,} params ({plan.preset.name} x{plan.scale:.3g}, "
          f"{len(shapes.shapes)} tensors, {plan.dtype}) on {env['device_name']} ({device}), median of "
          f"{plan.steps} interleaved steps")
    print()
    race_rows = race_section["results"] if race_section else None
    print(report.format_table(table, plan.baseline, roof, race_rows))
    note = report.busy_note(env)
    if note:
        print(note)
    if race_section:
        print()
        print(report.format_race(race_rows, race_section["config"]))
    if plan.out is not None:
        payload = {
            "environment": env,
            "workload": {"preset": plan.preset.name, "description": plan.preset.description,
                         "scale": plan.scale, "n_params": shapes.numel, "n_tensors": len(shapes.shapes),
                         "dtype": plan.dtype, "steps": plan.steps},
            "baseline": plan.baseline, "roof": roof.to_dict(), "results": table, "race": race_section,
        }
        print()
        _save(plan, payload)
    return 0 if any(r.ok for r in results) else 1
