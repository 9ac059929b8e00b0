"""Benchmark figures and tables drawn at build time from the committed results, so they never go stale.

Directives (the results directory is the ``benchmark_results_dir`` config value, relative to the
docs' source directory; every ``*.json`` in it is one run, see ``bench_results.py``):

``benchmark-runs``
    a table of the runs: file, device, processor, cores, Python, date, commit.
``benchmark-plot`` *kind*
    one matplotlib figure per run, inlined as SVG with a tooltip on every mark; *kind* is
    ``step-time``, ``bandwidth`` or ``state-memory`` (``bench_plots.py``).
``benchmark-table``
    per run and preset: median and IQR, speedup over torch's default Adam path, effective GB/s,
    fraction of the roof, state bytes per parameter.

A page using them is rebuilt when a results file changes. A file that is not a
``pytest benches --benchmark-json`` output, or an empty directory, is a build warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_results import ResultsError, Run, load_runs
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

# the figures keep a white background in furo's dark theme too (their text is drawn dark)
_FIGURE_STYLE = "background:#fff;border-radius:6px;padding:6px;margin:1em 0"
#: parsed runs, keyed by directory and the files' names and modification times
_RUNS: dict[tuple[str, tuple[tuple[str, int], ...]], list[Run]] = {}


def _table(headers: list[str], rows: list[list[str]], numeric_from: int = 1) -> nodes.table:
    table = nodes.table(classes=["benchmark-table"])
    group = nodes.tgroup(cols=len(headers))
    table += group
    group.extend(nodes.colspec(colwidth=1) for _ in headers)
    head, body = nodes.thead(), nodes.tbody()
    for cells, parent in [(headers, head)] + [(row, body) for row in rows]:
        row_node = nodes.row()
        for i, text in enumerate(cells):
            entry = nodes.entry(classes=["text-right"] if parent is body and i >= numeric_from else [])
            entry += nodes.paragraph(text=text)
            row_node += entry
        parent += row_node
    group += head
    group += body
    return table


class _ResultsDirective(SphinxDirective):
    """Loads the runs once per process and records the page's dependency on each file."""

    def runs(self) -> list[Run]:
        directory = Path(self.env.srcdir) / self.config.benchmark_results_dir
        key = (str(directory), tuple((p.name, p.stat().st_mtime_ns) for p in sorted(directory.glob("*.json"))))
        if key not in _RUNS:
            try:
                _RUNS[key] = load_runs(directory)
            except ResultsError as err:
                logger.warning("%s", err, location=self.get_location(), type="optimfx", subtype="benchmarks")
                _RUNS[key] = []
            if not _RUNS[key]:
                logger.warning("no benchmark results in %s", directory, location=self.get_location(),
                               type="optimfx", subtype="benchmarks")
        for run in _RUNS[key]:
            self.env.note_dependency(str(run.path))
        return _RUNS[key]


class BenchmarkRuns(_ResultsDirective):
    def run(self) -> list[nodes.Node]:
        rows = [[run.path.name, run.device, run.device_name, str(run.cores or "?"), run.python,
                 run.date[:16].replace("T", " ") + " UTC", run.commit + (" (dirty)" if run.dirty else "")]
                for run in self.runs()]
        return [_table(["results file", "device", "processor", "cores", "Python", "date", "commit"], rows,
                       numeric_from=99)]


class BenchmarkPlot(_ResultsDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from bench_plots import (  # matplotlib is imported only by pages with plots
            FIGURES,
            render_svg,
        )

        kind = self.arguments[0]
        if kind not in FIGURES:
            raise self.error(f"unknown benchmark plot {kind!r} (choose from {', '.join(FIGURES)})")
        out: list[nodes.Node] = []
        for run in self.runs():
            svg, _ = render_svg(kind, run, salt=f"{run.path.stem}-{kind}")
            html = f'<div class="benchmark-plot" style="{_FIGURE_STYLE}">{svg}</div>'
            out.append(nodes.raw("", html, format="html"))
        return out


class BenchmarkTable(_ResultsDirective):
    option_spec = {"preset": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        out: list[nodes.Node] = []
        for run in self.runs():
            for preset in run.presets:
                if self.options.get("preset", preset) != preset:
                    continue
                entries = [e for e in run.entries if e.preset == preset]
                base = next((e for e in entries if e.implementation == e.baseline), None)
                first = entries[0]
                caption = (f"{preset}: {first.params:,} parameters in {first.tensors} tensors, "
                           f"{run.label}; roof {first.roof_gbps:.1f} GB/s")
                rows = [[e.implementation, f"{e.median_s * 1e3:.1f}", f"{(e.q3_s - e.q1_s) * 1e3:.1f}",
                         f"{base.median_s / e.median_s:.2f}×" if base else "–", f"{e.gbps:.1f}",
                         f"{100 * e.gbps / e.roof_gbps:.0f}%", f"{e.state_bytes_per_param:.2f}"] for e in entries]
                table = _table(["implementation", "median ms", "IQR ms", f"speed vs {first.baseline}",
                                "GB/s", "of roof", "state B/param"], rows)
                title = nodes.title(text=caption)
                table.insert(0, title)
                out.append(table)
        return out


def setup(app: Any) -> dict[str, Any]:
    app.add_config_value("benchmark_results_dir", "../benches/results", "env", types=frozenset({str}))
    app.add_directive("benchmark-runs", BenchmarkRuns)
    app.add_directive("benchmark-plot", BenchmarkPlot)
    app.add_directive("benchmark-table", BenchmarkTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
