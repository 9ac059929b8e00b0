"""The PNG figure of ``optimfx bench``: step time per implementation and the race's curves.

matplotlib is optional (the ``bench`` extra): it is imported only here, only when a figure is
drawn, and through its object-oriented API with the Agg canvas, so the caller's pyplot state and
backend are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

#: How to get matplotlib when it is missing.
INSTALL_HINT = "pip install 'optimfx[bench]' (or pip install matplotlib)"
#: Colours by family: what you use now vs optimfx.
_COLOURS = {"torch": "#7f7f7f", "optimfx": "#1f77b4"}


def unavailable() -> str | None:
    """Why no figure can be drawn (matplotlib missing), or ``None``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"matplotlib is not installed: {INSTALL_HINT}"
    return None


def _step_time_panel(ax: Any, table: Sequence[dict[str, Any]], baseline: str) -> None:
    timed = [row for row in table if row.get("ms_median") is not None]
    names = [row["name"] for row in timed][::-1]
    values = [row["ms_median"] for row in timed][::-1]
    colours = [_COLOURS.get(row["family"], "#2ca02c") for row in timed][::-1]
    ax.barh(names, values, color=colours)
    for y, row in enumerate(timed[::-1]):
        if row.get("speedup") is not None:
            ax.annotate(f" {row['speedup']:.2f}x", (row["ms_median"], y), va="center", fontsize=7)
    ax.set_xlabel("median ms per step (bars: grey torch, blue optimfx)")
    ax.set_title(f"step time (speedup vs {baseline})", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    if values:
        ax.set_xlim(0, max(values) * 1.25)


def _race_panels(loss_ax: Any, acc_ax: Any, race: Sequence[dict[str, Any]]) -> None:
    for run in race:
        if not run["steps"]:
            continue
        # torch baselines dashed, wider and on top: an optimfx curve that matches one stays visible
        torch_run = run["name"].startswith("torch.")
        style = dict(linestyle="--" if torch_run else "-", linewidth=2.2 if torch_run else 1.2,
                     zorder=3 if torch_run else 2, label=run["name"])
        loss_ax.plot(run["steps"], run["train_loss"], **style)
        acc_ax.plot(run["steps"], [100 * a for a in run["test_accuracy"]], **style)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_title("training-set loss (dashed: torch)", fontsize=9)
    acc_ax.set_xlabel("step")
    acc_ax.set_title("test accuracy, %", fontsize=9)
    finals = [100 * r["final_test_accuracy"] for r in race if r["final_test_accuracy"] is not None]
    if finals:  # zoom on the finish, where the contenders differ
        acc_ax.set_ylim(max(min(finals) - 10.0, 0.0), 100.0)
    acc_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))


def save_figure(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw the report's step times and race curves into a PNG at ``path``."""
    reason = unavailable()
    if reason is not None:
        raise ImportError(f"cannot draw the optimfx bench figure: {reason}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    race = (report.get("race") or {}).get("results") or []
    panels = 3 if race else 1
    fig = Figure(figsize=(5.5 * panels, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _step_time_panel(axes[0], report["results"], report["baseline"])
    if race:
        _race_panels(axes[1], axes[2], race)
    env, workload = report["environment"], report["workload"]
    fig.suptitle(f"optimfx bench on {env['device_name']} ({env['device']}): "
                 f"{workload['n_params']:,} params, {workload['dtype']}"
                 + (f"; race: {report['race']['config']['dataset']}" if race else ""), fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
