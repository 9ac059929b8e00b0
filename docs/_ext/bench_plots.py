"""matplotlib figures of one benchmark run, returned as inline SVG with a tooltip on every mark.

Three figures, each drawn only from what the run recorded (:mod:`bench_results`):

* ``step-time``: median step time against parameter count (log-log), IQR as error bars, with the
  bandwidth floor ``params × 28 B / roof`` of a one-pass Adam-type step at the run's measured roof;
* ``bandwidth``: effective GB/s of each implementation per preset, against the measured roof;
* ``state-memory``: optimizer-state bytes per parameter element, measured from the state tensors.

Text stays text in the SVG (``svg.fonttype = "none"``) and ids are salted per figure, so several
figures can sit on one page and the output is byte-identical from build to build.
"""

from __future__ import annotations

import io
import re
from html import escape
from typing import Callable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from bench_results import Entry, Run  # noqa: E402

#: bytes per parameter of a one-pass fp32 Adam-type step (read p, g, m, v; write p, m, v)
FLOOR_BYTES_PER_PARAM = 28
MARKERS = "osD^v<>"
_RC = {"svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9, "axes.titlesize": 10,
       "figure.facecolor": "white", "axes.grid": True, "grid.alpha": 0.3}


def _colors(run: Run) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {impl: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, impl in enumerate(run.implementations)}


def _tip(entry: Entry) -> str:
    return (f"{entry.implementation} ({entry.backend}) on {entry.preset}: {entry.median_s * 1e3:.1f} ms "
            f"median (IQR {entry.q1_s * 1e3:.1f}–{entry.q3_s * 1e3:.1f} ms, {entry.rounds} rounds), "
            f"{entry.gbps:.1f} GB/s, {entry.state_bytes_per_param:.4g} B/param of state")


def step_time(run: Run, tips: dict[str, str]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7.6, 4.0))
    colors, markers = _colors(run), dict(zip(run.presets, MARKERS))
    # presets of the same size are drawn a few percent apart on the x axis, so they do not overlap
    dodge = {preset: 1.05 ** (i - (len(run.presets) - 1) / 2) for i, preset in enumerate(run.presets)}
    for e in run.entries:
        gid = f"{e.implementation}@{e.preset}"
        ms = e.median_s * 1e3
        spread = [[max(0.0, ms - e.q1_s * 1e3)], [max(0.0, e.q3_s * 1e3 - ms)]]
        bars = ax.errorbar(e.params * dodge[e.preset], ms, yerr=spread, fmt=markers[e.preset],
                           color=colors[e.implementation], markersize=6, capsize=2, alpha=0.9)
        bars.lines[0].set_gid(gid)
        tips[gid] = _tip(e)
    sizes = sorted({e.params for e in run.entries})
    xs = [sizes[0] / 1.6, sizes[-1] * 1.6]
    roof = run.entries[0].roof_gbps
    ax.plot(xs, [x * FLOOR_BYTES_PER_PARAM / roof / 1e6 for x in xs], "k--", lw=1,
            label=f"floor: {FLOOR_BYTES_PER_PARAM} B/param at the roof ({roof:.1f} GB/s)")
    for impl, color in colors.items():
        ax.plot([], [], "s", color=color, label=impl)
    for preset, marker in markers.items():
        tensors = next(e.tensors for e in run.entries if e.preset == preset)
        ax.plot([], [], marker, color="0.4", mfc="none", label=f"{preset} ({tensors} tensors)")
    ax.set(xscale="log", yscale="log", xlabel="parameters (fp32)", ylabel="median step time (ms)",
           title=f"Step time: {run.label}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


def bandwidth(run: Run, tips: dict[str, str]) -> plt.Figure:
    impls, presets, colors = run.implementations, run.presets, _colors(run)
    fig, axes = plt.subplots(1, len(presets), figsize=(7.6, 0.28 * len(impls) + 1.4), sharey=True, squeeze=False)
    top = max(max(e.gbps for e in run.entries), max(e.roof_gbps for e in run.entries)) * 1.15
    for ax, preset in zip(axes[0], presets):
        entries = {e.implementation: e for e in run.entries if e.preset == preset}
        for y, impl in enumerate(impls):
            e = entries.get(impl)
            if e is None:
                continue
            bar = ax.barh(y, e.gbps, color=colors[impl], height=0.7)[0]
            bar.set_gid(f"bw:{impl}@{preset}")
            tips[f"bw:{impl}@{preset}"] = _tip(e) + f", {100 * e.gbps / e.roof_gbps:.0f}% of the roof"
        roof = next(iter(entries.values()))
        ax.axvline(roof.roof_gbps, color="k", ls="--", lw=1)
        ax.text(roof.roof_gbps, len(impls) - 0.4, f" roof {roof.roof_gbps:.1f}", fontsize=7, va="bottom")
        ax.set(title=preset, xlim=(0, top), xlabel="effective GB/s")
    axes[0][0].set_yticks(range(len(impls)), impls)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Bandwidth against the roof ({run.entries[0].roof_kind}): {run.label}", fontsize=10)
    return fig


def state_memory(run: Run, tips: dict[str, str]) -> plt.Figure:
    optimizers = list(dict.fromkeys(e.optimizer for e in run.entries))
    presets = run.presets
    fig, ax = plt.subplots(figsize=(7.6, 0.45 * len(optimizers) + 1.2))
    height = 0.8 / len(presets)
    palette = plt.get_cmap("Set2").colors
    for i, preset in enumerate(presets):
        # the same optimizer keeps the same state whatever its backend: show it once per preset
        first = {}
        for e in run.entries:
            if e.preset == preset:
                first.setdefault(e.optimizer, e)
        for y, name in enumerate(optimizers):
            e = first.get(name)
            if e is None:
                continue
            offset = y - 0.4 + height * (i + 0.5)
            bar = ax.barh(offset, e.state_bytes_per_param, height=height * 0.9, color=palette[i],
                          label=preset if y == 0 else None)[0]
            bar.set_gid(f"mem:{name}@{preset}")
            tips[f"mem:{name}@{preset}"] = (f"{name} on {preset} ({e.params:,} params in {e.tensors} tensors): "
                                            f"{e.state_bytes_per_param:.4g} bytes of state per parameter")
            value = e.state_bytes_per_param
            ax.text(value * 1.08, offset, f"{value:.2f}" if value >= 1 else f"{value:.2g}", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(right=max(e.state_bytes_per_param for e in run.entries) * 3)
    ax.set_yticks(range(len(optimizers)), optimizers)
    ax.invert_yaxis()
    ax.set(xlabel="optimizer state, bytes per parameter element (log scale)",
           title=f"State memory (fp32 parameters): {run.label}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


FIGURES: dict[str, Callable[[Run, dict[str, str]], plt.Figure]] = {
    "step-time": step_time, "bandwidth": bandwidth, "state-memory": state_memory,
}


def _with_tooltips(svg: str, tips: dict[str, str]) -> str:
    """Insert an SVG ``<title>`` (a hover tooltip, read by screen readers) into each mark's group."""
    for gid, text in tips.items():
        svg = svg.replace(f'<g id="{escape(gid)}">', f'<g id="{escape(gid)}"><title>{escape(text)}</title>', 1)
    return svg


def render_svg(kind: str, run: Run, *, salt: str) -> tuple[str, dict[str, str]]:
    """The figure ``kind`` of ``run`` as an inline ``<svg>`` element, and the tooltips it carries."""
    tips: dict[str, str] = {}
    with plt.rc_context({**_RC, "svg.hashsalt": salt}):
        fig = FIGURES[kind](run, tips)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: HTML5 parses inline SVG
    # scale to the column: keep the viewBox, let CSS size it
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 style="width:100%;height:auto"', svg, count=1)
    return _with_tooltips(svg, tips), tips
