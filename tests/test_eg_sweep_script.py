"""``benches/eg_lr_sweep.py`` end to end on a tiny configuration: the outputs' structure, not the numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the sweep's tasks ship with scikit-learn")
pytest.importorskip("matplotlib", reason="the sweep draws its plot with matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "eg_lr_sweep.py"
TINY = ["--steps", "4", "--seeds", "2", "--lr-points", "3", "--shift-every", "10", "--shifts", "1",
        "--eg-configs", "gamma_scale=0.1", "--date", "2000-01-01"]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("eg_lr_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def outputs(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("eg-sweep")
    sweep.main([*TINY, "--out", str(out)])
    return out


def _strict(text: str) -> dict:
    def reject(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_writes_json_markdown_and_png(outputs):
    names = sorted(p.name for p in outputs.iterdir())
    assert names == [f"eg-lr-sweep-2000-01-01.{ext}" for ext in ("json", "md", "png")]
    assert (outputs / "eg-lr-sweep-2000-01-01.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_holds_every_point_seed_and_goal_row(outputs):
    report = _strict((outputs / "eg-lr-sweep-2000-01-01.json").read_text())
    cfg = report["config"]
    assert cfg["tasks"] == ["digits", "diabetes"] and cfg["bases"] == ["sgdm", "adam"]
    assert cfg["seeds"] == [0, 1] and len(cfg["lrs"]) == 3
    assert cfg["lrs"][0] == pytest.approx(1e-4) and cfg["lrs"][-1] == pytest.approx(1.0)
    assert {"torch", "cpu", "python"} <= set(report["environment"])
    methods = {"base", "eg:gamma_scale=0.1"}
    points = report["sweep"]
    assert len(points) == 2 * 2 * len(methods) * 3
    assert {p["method"] for p in points} == methods
    for p in points:
        assert [r["seed"] for r in p["runs"]] == [0, 1]
        assert set(p["loss"]) == {"mean", "std"}
        assert (p["acc"] is not None) == (p["task"] == "digits")
        if p["loss"]["mean"] is not None:  # null: a seed diverged
            assert p["loss"]["mean"] == pytest.approx(sum(r["loss"] for r in p["runs"]) / 2)
    goal = report["goal"]
    assert [(g["task"], g["base"]) for g in goal] == [("digits", "sgdm"), ("digits", "adam"),
                                                      ("diabetes", "sgdm"), ("diabetes", "adam")]
    for g in goal:
        assert isinstance(g["met"], bool) and g["base_best_lr"] in cfg["lrs"]
    stream = report["stream"]
    assert stream["task"] == "digits" and stream["shifts"] == 1
    assert {(r["base"], r["method"]) for r in stream["runs"]} == {(b, m) for b in ("sgdm", "adam") for m in methods}
    for run in stream["runs"]:
        assert len(run["curve"]) == 2 and all(math.isfinite(v) for v in run["curve"])
        assert [s["shift"] for s in run["per_shift"]] == [1]


def test_markdown_has_the_goal_and_one_table_per_task_and_base(outputs):
    text = (outputs / "eg-lr-sweep-2000-01-01.md").read_text()
    assert "## Goal: EG's worst final loss within 10 % of the base's best" in text
    for heading in ("## digits, sgdm", "## digits, adam", "## diabetes, sgdm", "## diabetes, adam",
                    "## Shift stream"):
        assert heading in text
    assert "torch " in text and "seeds | [0, 1]" in text


def test_render_redraws_the_same_markdown_from_the_json(sweep, outputs, tmp_path):
    for ext in ("json", "md"):
        (tmp_path / f"r.{ext}").write_bytes((outputs / f"eg-lr-sweep-2000-01-01.{ext}").read_bytes())
    (tmp_path / "r.md").write_text("stale")
    sweep.main(["--render", str(tmp_path / "r.json")])
    assert (tmp_path / "r.md").read_text() == (outputs / "eg-lr-sweep-2000-01-01.md").read_text()
    assert (tmp_path / "r.png").is_file()


def test_a_run_is_deterministic(sweep):
    task = sweep.load_task("diabetes")
    runs = [sweep.train(task, "adam", 1e-2, seed=0, steps=3, batch=8, eg={"gamma_scale": 0.1}) for _ in range(2)]
    assert runs[0]["loss"] == runs[1]["loss"]


def test_unknown_names_are_rejected(sweep):
    with pytest.raises(ValueError, match="task"):
        sweep.load_task("mnist")
    with pytest.raises(ValueError, match="base"):
        sweep.make_optimizer([], "lbfgs", 0.1, None)


def test_worker_processes_give_the_same_numbers(sweep, outputs, tmp_path):
    sweep.main([*TINY, "--out", str(tmp_path), "--jobs", "2"])
    serial = _strict((outputs / "eg-lr-sweep-2000-01-01.json").read_text())
    parallel = _strict((tmp_path / "eg-lr-sweep-2000-01-01.json").read_text())
    for key in ("sweep", "goal", "stream"):
        assert parallel[key] == serial[key], key


def _points(losses: dict[float, float]) -> list[dict]:
    return [{"lr": lr, "loss": {"mean": loss}} for lr, loss in losses.items()]


def test_widest_window_is_the_widest_run_of_consecutive_learning_rates_under_the_bound(sweep):
    # unsorted input; two runs under 1.0: [1e-4, 1e-3] and [1e-1, 10] (wider), broken by 1e-2
    pts = _points({1e-1: 0.5, 1e-4: 0.9, 1e-2: 1.5, 1e-3: 1.0, 1.0: 0.7, 10.0: 0.2, 100.0: math.inf})
    assert sweep.widest_window(pts, 1.0) == (1e-1, 10.0)
    assert sweep._decades(sweep.widest_window(pts, 1.0)) == pytest.approx(2.0)
    assert sweep.widest_window(pts, 0.6) == (1e-1, 1e-1)
    assert sweep.widest_window(pts, 0.1) is None and sweep._decades(None) == -1.0
    # every finite point under the bound; the diverged one (inf) ends the run
    assert sweep.widest_window(pts, 2.0) == (1e-4, 10.0)


def test_goal_rows_report_both_windows(outputs):
    report = _strict((outputs / "eg-lr-sweep-2000-01-01.json").read_text())
    lrs = report["config"]["lrs"]
    for g in report["goal"]:
        base = g["window"]["base"]
        assert base is not None and base[0] <= g["base_best_lr"] <= base[1]  # the best lr is within its own bound
        eg = g["window"]["eg"]
        assert eg is None or (eg[0] in lrs and eg[1] in lrs and eg[0] <= eg[1])
