"""Read the committed step-benchmark results (``benches/results/*.json``) into plain records.

Each file is the ``--benchmark-json`` output of one ``pytest benches`` run (pytest-benchmark's
layout: ``machine_info``, ``commit_info``, ``datetime`` and one entry per benchmark whose
``extra_info`` carries the figures ``benches/test_step.py`` adds). One file is one :class:`Run`: one
machine, one device, one date. Nothing here computes a figure the run did not record, except the
effective bandwidth of an entry whose run stored none (``params × bytes_per_param / median``, the
formula of ``benches/test_step.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One timed implementation on one preset."""

    implementation: str  # e.g. "AdaX:auto", "torch.Adam:fused"
    backend: str
    preset: str
    params: int
    tensors: int
    median_s: float
    q1_s: float
    q3_s: float
    rounds: int
    gbps: float  # effective bandwidth of the byte model
    bytes_per_param: float
    state_bytes_per_param: float
    roof_gbps: float
    roof_kind: str
    baseline: str  # the implementation the run compares against (torch's default Adam path)

    @property
    def optimizer(self) -> str:
        """The implementation's name without its backend (``"AdaX:auto"`` → ``"AdaX"``)."""
        return self.implementation.split(":", 1)[0]


@dataclass(frozen=True)
class Run:
    """One results file: one pytest-benchmark session on one machine."""

    path: Path
    device: str  # "cpu", "cuda", ...
    device_name: str
    cores: int | None
    date: str  # ISO 8601, UTC, as recorded
    python: str
    commit: str
    dirty: bool
    entries: tuple[Entry, ...]

    @property
    def presets(self) -> list[str]:
        return list(dict.fromkeys(e.preset for e in self.entries))

    @property
    def implementations(self) -> list[str]:
        return list(dict.fromkeys(e.implementation for e in self.entries))

    @property
    def label(self) -> str:
        return f"{self.device}: {self.device_name}, {self.date[:10]}"


class ResultsError(ValueError):
    """A results file that is not a ``pytest benches --benchmark-json`` output."""


def _entry(bench: dict[str, Any]) -> Entry:
    info, stats = bench["extra_info"], bench["stats"]
    gbps = info.get("effective_gbps")
    if gbps is None:
        gbps = info["params"] * info["bytes_per_param"] / stats["median"] / 1e9
    return Entry(
        implementation=info["implementation"], backend=info["backend"], preset=info["preset"],
        params=int(info["params"]), tensors=int(info["tensors"]), median_s=stats["median"],
        q1_s=stats["q1"], q3_s=stats["q3"], rounds=int(stats["rounds"]), gbps=gbps,
        bytes_per_param=info["bytes_per_param"], state_bytes_per_param=info["state_bytes_per_param"],
        roof_gbps=info["roof_gbps"], roof_kind=info["roof_kind"], baseline=info["torch_default"],
    )


def load_run(path: Path) -> Run:
    """Parse one results file; :class:`ResultsError` names what is missing."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "benchmarks" not in data or "machine_info" not in data:
        raise ResultsError(f"{path.name}: not a pytest-benchmark JSON file (no 'benchmarks'/'machine_info')")
    try:
        entries = tuple(_entry(b) for b in data["benchmarks"] if b.get("stats"))
    except KeyError as err:
        raise ResultsError(f"{path.name}: a benchmark lacks {err} (run with benches/test_step.py)") from None
    if not entries:
        raise ResultsError(f"{path.name}: no timed benchmark (was it a --benchmark-disable run?)")
    machine, commit = data["machine_info"], data.get("commit_info", {})
    device = data["benchmarks"][0]["extra_info"].get("device", "cpu")
    cpu = machine.get("cpu", {})
    host = cpu.get("brand_raw") or machine.get("machine", "unknown CPU")
    first = data["benchmarks"][0]["extra_info"]
    # the suite records the device type; a GPU's model only when the run stored it
    name = first.get("device_name") or (host if device == "cpu" else f"model not recorded, host {host}")
    return Run(
        path=path, device=device, device_name=name,
        cores=cpu.get("count"), date=data.get("datetime", ""), python=machine.get("python_version", ""),
        commit=str(commit.get("id", ""))[:7], dirty=bool(commit.get("dirty")), entries=entries,
    )


def load_runs(directory: Path) -> list[Run]:
    """Every ``*.json`` directly in ``directory``, oldest run first."""
    return sorted((load_run(p) for p in sorted(directory.glob("*.json"))), key=lambda r: r.date)
