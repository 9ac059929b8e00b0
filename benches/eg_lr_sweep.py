"""Does EG step-size adaptation remove the need to tune the learning rate? A sweep on real small tasks.

    python benches/eg_lr_sweep.py --out benches/results/eg-lr-sweep

Two tasks that ship with scikit-learn (no download): ``digits`` (8x8 images, 10 classes, an MLP
64-64-10, cross-entropy, test accuracy on a fixed 25 % split) and ``diabetes`` (10 features, an MLP
10-32-1, mean-squared error of the standardised target). For each base optimizer (``sgdm``: SGD with
momentum 0.9, the paper's setting; ``adam``) the initial learning rate is swept over log-spaced
points, with the base alone and with EG around it (``sgdm`` → :func:`optimfx.Funnel`, whose velocity
is the momentum; ``adam`` → :class:`optimfx.EGStepSize`), for several seeds at a fixed step budget.

The goal checked: across the sweep, EG's *worst* final train loss (mean over seeds) within 10 % of the
base optimizer's *best* one. A second experiment is a non-stationary stream: the digits labels are
re-permuted every ``shift_every`` steps, and the loss after each shift and the steps needed to get back
under a loss threshold are recorded.

Everything is seeded and runs on one CPU thread in float32, so two runs give the same numbers.
Outputs: ``eg-lr-sweep-<date>.json`` (every run), ``.md`` (the tables) and ``.png`` (the plots), in a
folder of their own (``benches/results/*.json`` are pytest-benchmark runs, which the docs build reads);
``--render FILE.json`` redraws the ``.md`` and ``.png`` from a results file without training.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import multiprocessing
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import optimfx
from optimfx.bench.report import environment

Tensor = torch.Tensor
#: EG configurations compared in the sweep: name -> keyword arguments of EGStepSize / Funnel. Only γ_s
#: changes (every other option at its default); it is spelled out so results do not move with a default.
#: With normalize=True the scale changes by at most exp(±γ_s) per step: 0.01 can move it e^3 = 20x in
#: 300 steps, 0.1 covers three decades (ln 1000 = 6.9) in 70 aligned steps, 0.3 in 23.
EG_CONFIGS: dict[str, dict[str, Any]] = {
    "gamma_scale=0.01": {"gamma_scale": 0.01},
    "gamma_scale=0.1": {"gamma_scale": 0.1},
    "gamma_scale=0.3": {"gamma_scale": 0.3},
    "gamma_scale=1": {"gamma_scale": 1.0},
    "gamma_scale=0.3/global": {"gamma_scale": 0.3, "scope": "global"},
}
#: the configurations a plain run compares (the others are there to be named with --eg-configs)
DEFAULT_CONFIGS = ("gamma_scale=0.01", "gamma_scale=0.1", "gamma_scale=0.3", "gamma_scale=1")
BASES = ("sgdm", "adam")
TASKS = ("digits", "diabetes")
GOAL = 1.10  # EG's worst final loss may exceed the base's best by at most 10 %
OFF_SCALE = 3.0  # plot: losses above this multiple of the base's worst finite one are drawn as a marker


@dataclass(frozen=True)
class Task:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    hidden: int
    classes: int  # 0: regression

    def model(self) -> nn.Module:
        out = self.classes or 1
        return nn.Sequential(nn.Linear(self.x_train.shape[1], self.hidden), nn.Tanh(), nn.Linear(self.hidden, out))

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.classes:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.squeeze(-1), y)


@functools.lru_cache(maxsize=None)
def load_task(name: str) -> Task:
    """A fixed 75/25 split (seed 0); digits pixels scaled to [0, 1], diabetes target standardised."""
    from sklearn import datasets

    if name == "digits":
        data = datasets.load_digits()
        x, y, classes, hidden = torch.tensor(data.data / 16.0), torch.tensor(data.target), 10, 64
    elif name == "diabetes":
        data = datasets.load_diabetes(scaled=False)
        x, y, classes, hidden = torch.tensor(data.data), torch.tensor(data.target), 0, 32
    else:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = (3 * len(x)) // 4
    train, test = order[:cut], order[cut:]
    x = x.float()
    if not classes:  # standardise features and target with the training statistics
        mu, sd = x[train].mean(0), x[train].std(0)
        x = (x - mu) / sd
        y = y.float()
        y = (y - y[train].mean()) / y[train].std()
    return Task(name, x[train], y[train], x[test], y[test], hidden, classes)


def make_optimizer(params: list[Tensor], base: str, lr: float, eg: dict[str, Any] | None) -> torch.optim.Optimizer:
    """The base optimizer at ``lr``, or EG around it (``eg`` holds the EG keyword arguments)."""
    if base == "sgdm":
        if eg is None:
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return optimfx.Funnel(params, lr=lr, momentum=0.9, **eg)
    if base == "adam":
        opt = torch.optim.Adam(params, lr=lr)
        return opt if eg is None else optimfx.EGStepSize(opt, **eg)
    raise ValueError(f"base must be one of {BASES}, got {base!r}")


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, y_train: Tensor | None = None) -> tuple[float, float | None]:
    """Full training-set loss, and test accuracy for classification."""
    loss = float(task.loss(model(task.x_train), task.y_train if y_train is None else y_train))
    if not task.classes:
        return loss, None
    return loss, float((model(task.x_test).argmax(-1) == task.y_test).float().mean())


def train(task: Task, base: str, lr: float, seed: int, steps: int, batch: int, eg: dict[str, Any] | None,
          labels: Callable[[int], Tensor] | None = None, eval_every: int = 0) -> dict[str, Any]:
    """One run of ``steps`` minibatch steps; ``labels(step)`` gives the training labels (shift stream).

    Returns the final train loss (``inf`` once the loss is not finite: the run stops there), the test
    accuracy, and every ``eval_every`` steps the full training-set loss under the current labels.
    """
    torch.manual_seed(seed)
    model = task.model()
    params = list(model.parameters())
    opt = make_optimizer(params, base, lr, eg)
    gen = torch.Generator().manual_seed(1000 + seed)
    curve: list[float] = []
    y_all = task.y_train
    for step in range(steps):
        if labels is not None:
            y_all = labels(step)
        if eval_every and step % eval_every == 0:
            curve.append(evaluate(task, model, y_all)[0])
        idx = torch.randint(len(task.x_train), (batch,), generator=gen)
        loss = task.loss(model(task.x_train[idx]), y_all[idx])
        if not math.isfinite(loss.item()):
            return {"loss": math.inf, "acc": None, "diverged": True, "curve": curve}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    final, acc = evaluate(task, model, y_all)
    diverged = not math.isfinite(final)
    return {"loss": math.inf if diverged else final, "acc": None if diverged else acc, "diverged": diverged,
            "curve": curve}


def _stats(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < len(values):
        return {"mean": math.inf, "std": None}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


def _methods(configs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None]]:
    """``("base", None)`` then ``("eg:<name>", kwargs)`` per EG configuration."""
    return [("base", None)] + [(f"eg:{name}", kw) for name, kw in configs.items()]


def _train_job(job: tuple[str, str, float, int, int, int, dict[str, Any] | None]) -> dict[str, Any]:
    """One sweep run, from picklable arguments (a worker process loads the task itself)."""
    task, base, lr, seed, steps, batch, eg = job
    torch.set_num_threads(1)
    return train(load_task(task), base, lr, seed, steps, batch, eg)


def sweep(tasks: list[Task], bases: list[str], configs: dict[str, dict[str, Any]], lrs: list[float],
          seeds: list[int], steps: dict[str, int], batch: dict[str, int], log: Callable[[str], None],
          jobs: int = 1) -> list[dict]:
    """Every (task, base, method, lr) point, with the per-seed runs and their mean ± std.

    With ``jobs > 1`` the runs are spread over that many worker processes; every run seeds itself and
    uses one thread, so the numbers do not depend on ``jobs``.
    """
    keys = [(task, base, method, eg, lr) for task in tasks for base in bases for method, eg in _methods(configs)
            for lr in lrs]
    work = [(task.name, base, lr, s, steps[task.name], batch[task.name], eg)
            for task, base, _, eg, lr in keys for s in seeds]
    start = time.perf_counter()
    results = _map(_train_job, work, jobs)
    log(f"{len(work)} runs in {time.perf_counter() - start:.1f} s ({jobs} process{'es' if jobs > 1 else ''})")
    points = []
    for i, (task, base, method, _, lr) in enumerate(keys):
        runs = results[i * len(seeds):(i + 1) * len(seeds)]
        points.append({"task": task.name, "base": base, "method": method, "lr": lr,
                       "loss": _stats([r["loss"] for r in runs]),
                       "acc": _stats([r["acc"] for r in runs]) if task.classes else None,
                       "runs": [{"seed": s, "loss": r["loss"], "acc": r["acc"]} for s, r in zip(seeds, runs)]})
    return points


def widest_window(points: list[dict], bound: float) -> tuple[float, float] | None:
    """The widest run of consecutive swept learning rates whose mean loss is ≤ ``bound``, as
    ``(lr_low, lr_high)``; ``None`` when no point is. ``points`` are one method's, any order."""
    ordered = sorted(points, key=lambda p: p["lr"])
    best, run_start = None, None
    for i, p in enumerate(ordered):
        if p["loss"]["mean"] <= bound:
            run_start = i if run_start is None else run_start
            window = (ordered[run_start]["lr"], p["lr"])
            if best is None or window[1] / window[0] > best[1] / best[0]:
                best = window
        else:
            run_start = None
    return best


def _decades(window: tuple[float, float] | None) -> float:
    """Width of a learning-rate window in decades (``-1`` for none, ``0`` for a single point)."""
    return -1.0 if window is None else math.log10(window[1] / window[0])


def goal(points: list[dict]) -> list[dict]:
    """Per (task, base, EG config): EG's worst mean loss over the sweep against the base's best."""
    out = []
    keys = sorted({(p["task"], p["base"]) for p in points}, key=lambda k: (TASKS.index(k[0]), BASES.index(k[1])))
    for task, base in keys:
        rows = [p for p in points if p["task"] == task and p["base"] == base]
        ref = [p for p in rows if p["method"] == "base"]
        best = min(ref, key=lambda p: p["loss"]["mean"])
        bound = GOAL * best["loss"]["mean"]
        within_base = sum(p["loss"]["mean"] <= bound for p in ref)
        base_window = widest_window(ref, bound)
        for method in dict.fromkeys(p["method"] for p in rows if p["method"] != "base"):
            eg = [p for p in rows if p["method"] == method]
            worst = max(eg, key=lambda p: p["loss"]["mean"])
            out.append({"task": task, "base": base, "method": method, "base_best_lr": best["lr"],
                        "base_best_loss": best["loss"]["mean"], "eg_worst_lr": worst["lr"],
                        "eg_worst_loss": worst["loss"]["mean"],
                        "ratio": worst["loss"]["mean"] / best["loss"]["mean"],
                        "met": worst["loss"]["mean"] <= GOAL * best["loss"]["mean"],
                        "lrs_within_10pct": {"base": within_base, "eg": sum(p["loss"]["mean"] <= bound for p in eg)},
                        "window": {"base": base_window, "eg": widest_window(eg, bound)}})
    return out


def _relabelled(task: Task, shifts: int) -> list[Tensor]:
    """The training labels of each stream segment: the original ones, then ``shifts`` fixed permutations."""
    perms = [torch.arange(task.classes)] + [
        torch.randperm(task.classes, generator=torch.Generator().manual_seed(100 + k)) for k in range(shifts)]
    return [perm[task.y_train] for perm in perms]


def _stream_job(job: tuple[str, str, float, int, int, int, int, int, dict[str, Any] | None]) -> list[float]:
    """One stream run's loss curve, from picklable arguments."""
    task_name, base, lr, seed, shifts, every, batch, eval_every, eg = job
    torch.set_num_threads(1)
    task = load_task(task_name)
    relabelled = _relabelled(task, shifts)
    steps = every * (shifts + 1)
    curve = train(task, base, lr, seed, steps, batch, eg, lambda step: relabelled[min(step // every, shifts)],
                  eval_every)["curve"]
    return curve + [math.inf] * (steps // eval_every - len(curve))  # a diverged run stops early


def _map(fn: Callable[[Any], Any], work: list[Any], jobs: int) -> list[Any]:
    """``[fn(w) for w in work]``, over ``jobs`` worker processes when ``jobs > 1`` (order kept)."""
    if jobs <= 1:
        return [fn(w) for w in work]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(fn, work, chunksize=1)


def shift_stream(task: Task, bases: list[str], configs: dict[str, dict[str, Any]], lr: dict[str, float],
                 seeds: list[int], shifts: int, every: int, batch: int, eval_every: int, threshold: float,
                 jobs: int = 1) -> dict:
    """Digits with the labels re-permuted every ``every`` steps: loss curves and recovery per shift."""
    keys = [(base, method, eg) for base in bases for method, eg in _methods(configs)]
    work = [(task.name, base, lr[base], s, shifts, every, batch, eval_every, eg) for base, _, eg in keys for s in seeds]
    results = _map(_stream_job, work, jobs)
    curves = []
    for i, (base, method, _) in enumerate(keys):
        runs = results[i * len(seeds):(i + 1) * len(seeds)]
        mean = [statistics.fmean(v) for v in zip(*runs)]
        per_shift = []
        for k in range(1, shifts + 1):
            seg = mean[k * every // eval_every:(k + 1) * every // eval_every]
            under = next((i for i, v in enumerate(seg) if v <= threshold), None)
            per_shift.append({"shift": k, "loss_after": seg[0], "loss_end": seg[-1],
                              "steps_to_recover": None if under is None else under * eval_every})
        curves.append({"base": base, "method": method, "lr": lr[base], "curve": mean, "per_shift": per_shift})
    return {"task": task.name, "every": every, "shifts": shifts, "eval_every": eval_every,
            "threshold": threshold, "seeds": seeds, "runs": curves}


def _fmt(stat: dict | None, digits: int = 4) -> str:
    if stat is None:
        return "–"
    if not math.isfinite(stat["mean"]):
        return "diverged"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _window_cell(window: list[float] | None) -> str:
    if window is None:
        return "–"
    low, high = window
    span = f"{low:.3g}" if low == high else f"{low:.3g}–{high:.3g}"
    return f"{span} ({_decades(window):.1f} dec.)"


def markdown(report: dict) -> str:
    """The measured tables, with the machine, versions, seeds and the goal's verdict."""
    cfg, env = report["config"], report["environment"]
    methods = [name for name, _ in _methods(cfg["eg_configs"])]
    out = [f"# EG step-size adaptation: learning-rate sweep, {report['date']}", "",
           "Produced by `python benches/eg_lr_sweep.py " + " ".join(cfg["argv"]) + "`; every figure below is "
           f"in `{report['stem']}.json`.", "",
           "| | |", "|---|---|",
           f"| machine | {env['cpu']}, {env['cpu_count']} CPUs, {env['platform']} |",
           f"| software | Python {env['python']}, torch {env['torch']}, optimfx {env['optimfx']}; "
           f"{cfg['threads']} torch thread, float32 |",
           f"| seeds | {cfg['seeds']} (model init `torch.manual_seed(seed)`, batches from seed + 1000) |",
           "| budget | " + ", ".join(f"{t}: {cfg['steps'][t]} steps of batch {cfg['batch'][t]}" for t in cfg["tasks"])
           + " |",
           f"| learning rates | {', '.join(f'{lr:.3g}' for lr in cfg['lrs'])} |",
           "| EG configurations | " + "; ".join(f"`{k}`: `{v or 'defaults'}`" for k, v in cfg["eg_configs"].items())
           + " |", f"| wall time | {report['seconds']:.0f} s |", "",
           "## Goal: EG's worst final loss within 10 % of the base's best", "",
           "Means over seeds of the final full training-set loss; *lrs within 10 %* counts the swept learning "
           "rates whose mean loss is at most 1.1 × the base's best, and *widest window* is the widest run of "
           "consecutive swept learning rates that all are (its width in decades; – none).", "",
           "| task | base | EG config | base best (lr) | EG worst (lr) | ratio | met | lrs within 10 %: base / EG "
           "| widest window: base | widest window: EG |",
           "|---|---|---|---|---|---:|---|---|---|---|"]
    for g in report["goal"]:
        out.append(f"| {g['task']} | {g['base']} | {g['method']} | {g['base_best_loss']:.4f} ({g['base_best_lr']:.3g}) "
                   f"| {g['eg_worst_loss']:.4g} ({g['eg_worst_lr']:.3g}) | {g['ratio']:.3g} | "
                   f"{'yes' if g['met'] else 'no'} | {g['lrs_within_10pct']['base']} / {g['lrs_within_10pct']['eg']} | "
                   f"{_window_cell(g.get('window', {}).get('base'))} | {_window_cell(g.get('window', {}).get('eg'))} |")
    for task in cfg["tasks"]:
        for base in cfg["bases"]:
            rows = [p for p in report["sweep"] if p["task"] == task and p["base"] == base]
            metric = "final train loss" + (" / test accuracy" if rows[0]["acc"] is not None else "")
            out += ["", f"## {task}, {base}: {metric} (mean ± std over seeds)", "",
                    "| lr | " + " | ".join(methods) + " |", "|---:|" + "---|" * len(methods)]
            for lr in cfg["lrs"]:
                cells = []
                for m in methods:
                    p = next(p for p in rows if p["method"] == m and p["lr"] == lr)
                    cell = _fmt(p["loss"])
                    if p["acc"] is not None and math.isfinite(p["acc"]["mean"]):
                        cell += f" / {_fmt(p['acc'], 3)}"
                    cells.append(cell)
                out.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
    stream = report["stream"]
    if stream:
        out += ["", f"## Shift stream: {stream['task']} labels re-permuted every {stream['every']} steps", "",
                f"Full training-set loss under the current labels, every {stream['eval_every']} steps, mean over "
                f"seeds {stream['seeds']}. *Recover*: steps after the shift until the loss is ≤ "
                f"{stream['threshold']} (– never within the segment).", "",
                "| base (lr) | method | shift | loss after | loss at segment end | steps to recover |",
                "|---|---|---:|---:|---:|---:|"]
        for run in stream["runs"]:
            for s in run["per_shift"]:
                rec = "–" if s["steps_to_recover"] is None else str(s["steps_to_recover"])
                out.append(f"| {run['base']} ({run['lr']:.3g}) | {run['method']} | {s['shift']} | "
                           f"{s['loss_after']:.3f} | {s['loss_end']:.4f} | {rec} |")
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> None:
    """Final loss vs initial lr (log-log, error bars = std over seeds) and the shift stream's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, stream = report["config"], report["stream"]
    methods = [name for name, _ in _methods(cfg["eg_configs"])]
    panels = [(t, b) for t in cfg["tasks"] for b in cfg["bases"]]
    cols = len(cfg["bases"])
    rows = len(cfg["tasks"]) + (1 if stream else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (task, base) in zip(axes.flat, panels):
        rows = [p for p in report["sweep"] if p["task"] == task and p["base"] == base]
        best = min(p["loss"]["mean"] for p in rows if p["method"] == "base")
        # a blown-up run would flatten the rest of the panel
        finite = [p["loss"]["mean"] for p in rows if p["method"] == "base" and math.isfinite(p["loss"]["mean"])]
        cap = OFF_SCALE * max(finite)
        for m in methods:
            pts = [p for p in rows if p["method"] == m and math.isfinite(p["loss"]["mean"])]
            shown = [p for p in pts if p["loss"]["mean"] <= cap]
            bars = ax.errorbar([p["lr"] for p in shown], [p["loss"]["mean"] for p in shown],
                               yerr=[p["loss"]["std"] for p in shown], marker="o", ms=3, capsize=2, label=m)
            off = [p["lr"] for p in pts if p["loss"]["mean"] > cap]
            ax.plot(off, [cap] * len(off), "^", color=bars[0].get_color(), ms=6)
        ax.axhline(GOAL * best, color="grey", lw=0.8, ls="--", label="1.1 x base best")
        ax.set(xscale="log", yscale="log", xlabel="initial learning rate", ylabel="final train loss",
               title=f"{task}, {base}, {cfg['steps'][task]} steps (missing: diverged; ▲: off scale)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    if stream:
        for ax, base in zip(axes[-1], cfg["bases"]):
            for run in (r for r in stream["runs"] if r["base"] == base):
                steps = [i * stream["eval_every"] for i in range(len(run["curve"]))]
                ax.plot(steps, run["curve"], lw=1, label=run["method"])
            for k in range(1, stream["shifts"] + 1):
                ax.axvline(k * stream["every"], color="grey", lw=0.5, ls=":")
            ax.axhline(stream["threshold"], color="grey", lw=0.5)
            lr = next(r["lr"] for r in stream["runs"] if r["base"] == base)
            ax.set(yscale="log", xlabel="step", ylabel="train loss (current labels)",
                   title=f"shift stream: {stream['task']}, {base}, lr {lr:.3g}")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(x: Any) -> Any:
    """Strict JSON: ``inf`` (diverged) is written as ``null``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _from_json(x: Any, key: str = "") -> Any:
    """Inverse of :func:`_json_safe` for the fields where ``null`` stands for ``inf``."""
    if isinstance(x, dict):
        return {k: _from_json(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v, key) for v in x]
    return math.inf if x is None and key in ("mean", "loss", "base_best_loss", "eg_worst_loss", "ratio", "curve") else x


def render(path: Path) -> None:
    """Rewrite the ``.md`` and ``.png`` next to a results ``.json`` from its numbers (no training)."""
    report = _from_json(json.loads(path.read_text()))
    path.with_suffix(".md").write_text(markdown(report))
    plot(report, path.with_suffix(".png"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # not benches/results itself: every *.json there is read as a pytest-benchmark run by the docs build
    ap.add_argument("--out", type=Path, default=Path("benches/results/eg-lr-sweep"), help="output folder")
    ap.add_argument("--render", type=Path, help="only redraw the .md and .png of this results .json")
    ap.add_argument("--date", default=_dt.datetime.now(_dt.timezone.utc).date().isoformat(),
                    help="date in the file names (default: today, UTC)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--eg-configs", default=",".join(DEFAULT_CONFIGS), help=f"subset of {list(EG_CONFIGS)}")
    ap.add_argument("--lr-min", type=float, default=1e-4)
    ap.add_argument("--lr-max", type=float, default=1.0)
    ap.add_argument("--lr-points", type=int, default=9)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="step budget of every sweep run")
    ap.add_argument("--shift-every", type=int, default=200, help="steps between label permutations (0: no stream)")
    ap.add_argument("--shifts", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.3, help="recovery threshold of the stream's loss")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each); numbers do not change")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep and the stream, write ``<out>/eg-lr-sweep-<date>.{json,md,png}``, return the report."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention, and one thread is deterministic
    try:
        args = parse_args(argv)
        if args.render is not None:
            render(args.render)
            return _from_json(json.loads(args.render.read_text()))
        return _run(args, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str]) -> dict:
    start = time.perf_counter()
    tasks = [load_task(t) for t in args.tasks.split(",")]
    bases = args.bases.split(",")
    unknown = [name for name in args.eg_configs.split(",") if name not in EG_CONFIGS]
    if unknown:
        raise SystemExit(f"--eg-configs: unknown {unknown}; choose from {list(EG_CONFIGS)}")
    configs = {name: EG_CONFIGS[name] for name in args.eg_configs.split(",")}
    ratio = (args.lr_max / args.lr_min) ** (1 / max(args.lr_points - 1, 1))
    lrs = [args.lr_min * ratio ** i for i in range(args.lr_points)]
    seeds = list(range(args.seeds))
    steps = {t.name: args.steps for t in tasks}
    batch = {"digits": 64, "diabetes": 32}
    log = lambda msg: print(msg, flush=True)
    points = sweep(tasks, bases, configs, lrs, seeds, steps, batch, log, args.jobs)
    stream = None
    digits = next((t for t in tasks if t.name == "digits"), None)
    if args.shift_every and digits is not None:
        # each base runs at its best learning rate of the sweep (the tuned baseline)
        best = {b: min((p for p in points if p["task"] == "digits" and p["base"] == b and p["method"] == "base"),
                       key=lambda p: p["loss"]["mean"])["lr"] for b in bases}
        stream = shift_stream(digits, bases, configs, best, seeds, args.shifts, args.shift_every, batch["digits"],
                              eval_every=10, threshold=args.threshold, jobs=args.jobs)
    stem = f"eg-lr-sweep-{args.date}"
    report = {"stem": stem, "date": args.date, "environment": environment("cpu"),
              "config": {"argv": argv, "tasks": [t.name for t in tasks], "bases": bases, "eg_configs": configs,
                         "lrs": lrs, "seeds": seeds, "steps": steps, "batch": {t.name: batch[t.name] for t in tasks},
                         "threads": 1, "goal_factor": GOAL},
              "goal": goal(points), "sweep": points, "stream": stream}
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    for g in report["goal"]:
        log(f"goal {g['task']:8s} {g['base']:4s} {g['method']:14s} ratio {g['ratio']:.3g} "
            f"{'met' if g['met'] else 'missed'}")
    log(f"wrote {args.out / stem}.{{json,md,png}} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
