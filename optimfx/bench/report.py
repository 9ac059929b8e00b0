"""Tables and JSON reports: ms/step, speedup, effective GB/s, fraction of the roof, and the race."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch

from .roofline import Roof
from .timing import Result, quantile


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_note(env: dict[str, Any]) -> str | None:
    """A warning line when the CPU was shared during a CPU run: the 1-minute load average at the
    start or the end (``loadavg``, ``loadavg_end``) above the number of CPUs. Other work then takes
    turns with the timed steps, and both the times and the ratios can move severalfold."""
    cpus = env.get("cpus_usable") or env.get("cpu_count")
    if env.get("device", "cpu") != "cpu" or not cpus:
        return None
    loads = [pair[0] for pair in (env.get("loadavg"), env.get("loadavg_end")) if pair]
    if not loads or max(loads) <= cpus:
        return None
    seen = " and ".join(f"{x:.1f}" for x in loads)
    return (f"note: the load average was {seen} on {cpus} CPUs: other work shared the cores, so "
            "the times and ratios above are noisy; rerun on an idle machine to compare")


def load_average() -> list[float] | None:
    """``os.getloadavg()``, or ``None`` where there is none (Windows) or it cannot be read."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def usable_cpus() -> int | None:
    """The CPUs this process may run on (its affinity mask, a container's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def environment(device: torch.device | str) -> dict[str, Any]:
    """Versions and machine facts worth keeping next to the figures."""
    import optimfx
    from optimfx._kernels import cpu_build

    device = torch.device(device)
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "optimfx": optimfx.__version__, "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cpus_usable": usable_cpus(),
        "loadavg": load_average(),
    }
    if device.type == "cpu":
        # builds them on first use, as the optimizers' first step would
        env["cpu_kernels"] = cpu_build.status()
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = env["cpu"]
    return env


def rows(results: Sequence[Result], baseline: str, roof: Roof | None) -> list[dict[str, Any]]:
    """One dict per implementation with the derived figures (``None`` where it did not run).

    ``speedup`` is ``median(baseline) / median(impl)``: above 1 the implementation is faster.
    """
    base = next((r for r in results if r.name == baseline and r.ok), None)
    out = []
    for r in results:
        row: dict[str, Any] = {
            "name": r.name, "family": r.family, "backend": r.backend, "error": r.error,
            "n_params": r.n_params, "bytes_per_param": r.bytes_per_param,
            "state_bytes": r.state_bytes,
            "state_bytes_per_param": r.state_bytes / r.n_params if r.n_params else None,
            "first_step_ms": r.first_step_s * 1e3 if r.ok else None,
            "warmup_ms": r.warmup_s * 1e3 if r.ok else None,
            "steps": len(r.seconds), "ms": [s * 1e3 for s in r.seconds],
            "ms_median": None, "ms_p20": None, "ms_p80": None, "speedup": None,
            "gbps": None, "roof_fraction": None,
        }
        if r.ok:
            row.update(ms_median=r.median_s * 1e3, ms_p20=quantile(r.seconds, 0.2) * 1e3,
                       ms_p80=quantile(r.seconds, 0.8) * 1e3, gbps=r.gbps)
            if base is not None:
                row["speedup"] = base.median_s / r.median_s
            if roof is not None:
                row["roof_fraction"] = r.gbps / roof.gbps
        out.append(row)
    return out


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _render(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    """Header, rule and rows in fixed-width columns: the first two left-aligned, numbers right."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [render(header), "  ".join("-" * w for w in widths), *map(render, lines)]


def race_by_implementation(race: Sequence[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Race results keyed by the implementation each contender ran as (``"AdaX:auto"``)."""
    return {run["implementation"]: run for run in race or ()}


def format_table(table: Sequence[dict[str, Any]], baseline: str, roof: Roof | None,
                 race: Sequence[dict[str, Any]] | None = None) -> str:
    """A fixed-width text table, with a legend under it.

    With ``race`` (:meth:`RaceResult.to_dict` rows), the final training loss and test accuracy are
    shown on the row of the implementation each contender ran as; a contender that was not timed
    (one left out of ``--optimizers``' timing, or whose timing failed) gets a row of its own.
    """
    header = ["implementation", "backend", "ms/step", "p20-p80 ms", "speedup", "GB/s", "of roof",
              "state B/param"]
    by_impl = race_by_implementation(race)
    if race:
        header += ["final loss", "test acc"]
    timed_names = {row["name"] for row in table}
    lines = []
    for row in table:
        spread = (f"{row['ms_p20']:.3g}-{row['ms_p80']:.3g}" if row["ms_median"] is not None else "-")
        line = [row["name"], row["backend"] or "-", _fmt(row["ms_median"], ".3f"), spread,
                _fmt(row["speedup"], ".2f", "x"), _fmt(row["gbps"], ".1f"),
                _fmt(row["roof_fraction"] and 100 * row["roof_fraction"], ".0f", "%"),
                _fmt(row["state_bytes_per_param"], ".2f")]
        if race:
            line += _race_cells(by_impl.get(row["name"]))
        lines.append(line)
    for name, run in by_impl.items():
        if name not in timed_names:
            lines.append([name, "-", "-", "-", "-", "-", "-", _fmt(run["state_bytes_per_param"], ".2f"),
                          *_race_cells(run)])
    text = _render(header, lines)
    errors = [f"  {row['name']}: {row['error']}" for row in table if row["error"]]
    errors += [f"  {run['name']} (race): {run['error']}" for run in race or () if run["error"]]
    if errors:
        text += ["", "not run:", *errors]
    bpp = sorted({f"{row['bytes_per_param']:.4g}" for row in table if row["ms_median"] is not None})
    text += ["",
             f"speedup = median ms of {baseline} (torch.optim.Adam's default here) / median ms; "
             ">1 is faster.",
             f"GB/s = params x minimum bytes/param ({', '.join(bpp) or '-'}) / median step time."]
    if roof is not None:
        text.append(f"roof = {roof.rmw.kind}: {roof.gbps:.1f} GB/s over "
                    f"{roof.rmw.footprint / 2**20:.0f} MiB, measured in this process"
                    + (f" (D2D copy: {roof.copy.gbps:.1f} GB/s)" if roof.copy is not None else "") + ".")
    if race:
        text.append("final loss, test acc = the convergence race below, run once per optimizer with "
                    "its default implementation.")
    return "\n".join(text)


def _race_cells(run: dict[str, Any] | None) -> list[str]:
    if run is None:
        return ["-", "-"]
    return [_fmt(run["final_train_loss"], ".4f"),
            _fmt(run["final_test_accuracy"] and 100 * run["final_test_accuracy"], ".1f", "%")]


def format_race(race: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    """The race's settings and results, one line per contender."""
    header = ("contender", "settings", "train loss", "test loss", "test acc", "seconds")
    lines = [(run["name"], run["settings"], _fmt(run["final_train_loss"], ".4f"),
              _fmt(run["final_test_loss"], ".4f"),
              _fmt(run["final_test_accuracy"] and 100 * run["final_test_accuracy"], ".1f", "%"),
              _fmt(run["seconds"], ".1f")) for run in race]
    title = (f"convergence race: {config['dataset']}, {config['model']}, {config['steps']} steps of "
             f"batch {config['batch_size']}, seed {config['seed']}, same initialisation and batches "
             "for every optimizer")
    return "\n".join([title, "", *_render(header, lines)])


def report_path(folder: str | os.PathLike[str], device: str) -> Path:
    """``<folder>/bench-<device>-<UTC time>.json`` (the folder is created); the figure takes the
    same name with ``.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return folder / f"bench-{device.replace(':', '')}-{stamp}.json"


def write_json(report: dict[str, Any], folder: str | os.PathLike[str],
               path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``report`` to ``path``, by default :func:`report_path` under ``folder``."""
    if path is None:
        path = report_path(folder, str(report.get("environment", {}).get("device", "device")))
    path = Path(path)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
