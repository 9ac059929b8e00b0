"""Markdown tables from a ``--benchmark-json`` file: one table per preset, ratios vs torch's default.

    python -m benches.summarize benches/results/cpu-2026-11-22.json

Every figure comes from the file: the median step time, its IQR, the speedup over
``torch.optim.Adam``'s default path in the same preset (``extra_info["torch_default"]``), the
effective GB/s of the byte model, the fraction of the roof measured in that run, and state bytes.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _impl(bench: dict) -> str:
    return bench["extra_info"]["implementation"]


def tables(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    out = []
    for group, benches in groups.items():
        info0 = benches[0]["extra_info"]
        base = next((b for b in benches if _impl(b) == info0["torch_default"]), None)
        out += [f"### {group}: {info0['params']:,} params in {info0['tensors']} tensors "
                f"(roof {info0['roof_gbps']:.1f} GB/s)", "",
                "| implementation | backend | median ms | IQR ms | speedup vs torch default | "
                "GB/s | of roof | state B/param | first step ms |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for b in benches:
            info, stats = b["extra_info"], b["stats"]
            speedup = base["stats"]["median"] / stats["median"] if base else float("nan")
            out.append(
                f"| {_impl(b)} | {info['backend']} | {stats['median'] * 1e3:.1f} | "
                f"{stats['iqr'] * 1e3:.1f} | {speedup:.2f}x | {info['effective_gbps']:.1f} | "
                f"{100 * info['roof_fraction']:.0f}% | {info['state_bytes_per_param']:.2f} | "
                f"{info['first_step_ms']:.0f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benches.summarize BENCHMARK.json")
    print(tables(json.loads(Path(argv[0]).read_text())))


if __name__ == "__main__":
    main()
