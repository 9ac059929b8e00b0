"""``optimfx bench`` end to end on a tiny workload, its race and figure, and its argument errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import optimfx
from optimfx.bench import race, registry
from optimfx.cli import main

# a tiny workload: the smoke preset, a 16 MiB roof, three rounds, no race unless a test asks
TINY = ["--preset", "smoke", "--steps", "3", "--roof-mib", "16", "--device", "cpu", "--race-steps", "0",
        "--no-plot"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_table_and_json_report(tmp_path, capsys):
    rc = main(["bench", *TINY, "--optimizers", "AdaX,torch.Adam:fused", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("implementation"))
    for column in ("ms/step", "speedup", "GB/s", "of roof", "state B/param"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("AdaX", "torch.Adam"))}
    # torch.optim.Adam's default path (single-tensor on CPU) joins as the baseline
    assert set(rows) == {"torch.Adam:single", "AdaX:auto", "torch.Adam:fused"}
    assert rows["torch.Adam:single"][4] == "1.00x"
    assert rows["AdaX:auto"][1] == "reference"

    (path,) = tmp_path.glob("bench-cpu-*.json")
    assert f"report written to {path}" in out
    report = json.loads(path.read_text())
    assert report["baseline"] == "torch.Adam:single"
    assert report["workload"] == {"preset": "smoke", "description": report["workload"]["description"],
                                  "scale": 1.0, "n_params": 12406, "n_tensors": 6,
                                  "dtype": "float32", "steps": 3}
    assert report["environment"]["torch"] == torch.__version__
    assert report["roof"]["gbps"] > 0 and len(report["roof"]["rmw"]["seconds"]) == 20
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["torch.Adam:single", "AdaX:auto", "torch.Adam:fused"]
    for r in results.values():
        assert r["error"] is None and r["steps"] == 3 and len(r["ms"]) == 3
        assert r["n_params"] == 12406
        assert r["bytes_per_param"] == 28.0
        # m and v in fp32, plus a 0-d step counter per tensor
        assert r["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["gbps"] == pytest.approx(12406 * 28 / (r["ms_median"] / 1e3) / 1e9)
        assert r["roof_fraction"] == pytest.approx(r["gbps"] / report["roof"]["gbps"])
    assert results["torch.Adam:single"]["speedup"] == 1.0
    assert results["AdaX:auto"]["backend"] == "reference"
    assert report["race"] is None and report["files"] == {"json": path.name, "png": None}
    assert not list(tmp_path.glob("*.png"))


def test_race_figure_and_report_end_to_end(tmp_path, capsys):
    steps = 12
    argv = [*TINY[:-3], "--race-steps", str(steps), "--optimizers", "AdaX,EGStepSize", "--out", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "race:" in captured.err  # the progress bar (tqdm is installed with the test extra)
    lines = captured.out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("implementation"))
    assert lines[start].split()[-4:] == ["final", "loss", "test", "acc"]
    table = lines[start + 2:lines.index("", start)]
    rows = {line.split()[0]: line.split() for line in table}
    assert set(rows) == {"torch.Adam:single", "AdaX:auto", "EGStepSize:auto"}
    # the race's figures sit on the row of the implementation each contender ran as, the wrapper's
    # too (timed around torch.optim.Adam, as it races; its backend is that of EG's own passes)
    for name in rows:
        assert rows[name][-1].endswith("%") and float(rows[name][2]) > 0
    assert rows["EGStepSize:auto"][1] == "reference"
    assert any(line.startswith("convergence race: scikit-learn digits") for line in lines)

    (path,) = tmp_path.glob("bench-cpu-*.json")
    report = json.loads(path.read_text())
    png = tmp_path / report["files"]["png"]
    assert png == path.with_suffix(".png") and png.read_bytes()[:8] == PNG_MAGIC
    assert f"figure written to {png}" in captured.out
    config = report["race"]["config"]
    assert config["steps"] == steps and config["eval_steps"][0] == 0 and config["eval_steps"][-1] == steps
    runs = {r["name"]: r for r in report["race"]["results"]}
    assert list(runs) == ["torch.Adam", "AdaX", "EGStepSize"]  # the baseline always races
    assert runs["AdaX"]["implementation"] == "AdaX:auto" and runs["EGStepSize"]["implementation"] == "EGStepSize:auto"
    for run in runs.values():
        assert run["error"] is None and run["steps"] == config["eval_steps"]
        assert len(run["train_loss"]) == len(run["test_loss"]) == len(run["test_accuracy"]) == len(run["steps"])
        assert run["final_train_loss"] == run["train_loss"][-1] < run["train_loss"][0]
        assert 0.0 <= run["final_test_accuracy"] <= 1.0 and run["seconds"] > 0
    # same initialisation for every contender: identical losses before the first step
    assert len({run["train_loss"][0] for run in runs.values()}) == 1
    assert runs["AdaX"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    # the wrapped torch.optim.Adam's m and v + EG's gains, velocity and average gradient, all fp32,
    # + the saved parameters EG keeps between steps (outside its state)
    assert runs["EGStepSize"]["state_bytes_per_param"] == pytest.approx(24.0, abs=0.01)


def test_race_is_reproducible_and_seeded():
    config = race.RaceConfig(steps=6, eval_points=3)
    contenders = registry.select_contenders(["torch.Adam", "AdaXW"])
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    first, again = (race.run_race(contenders, config) for _ in range(2))
    # the caller's thread count and global RNG are left as they were
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert [r.to_dict() | {"seconds": 0} for r in first] == [r.to_dict() | {"seconds": 0} for r in again]
    other = race.run_race(contenders, race.RaceConfig(steps=6, eval_points=3, seed=1))
    assert other[0].train_loss != first[0].train_loss
    assert first[0].steps == [0, 2, 4, 6]


def test_bundled_digits_file_reads_as_load_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    pixels, labels = race.load_digits_table()
    data = datasets.load_digits()
    assert torch.equal(pixels, torch.tensor(data.data, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(data.target, dtype=torch.int64))


def test_race_reports_a_diverging_contender():
    huge = registry.Contender("torch.SGD", "torch", "lr=1e6", lambda p: torch.optim.SGD(p, lr=1e6))
    (result,) = race.run_race([huge], race.RaceConfig(steps=8, eval_points=8))
    assert not result.ok and "diverged by step" in result.error
    assert not math.isfinite(result.train_loss[-1])
    assert result.to_dict()["final_train_loss"] is None


def test_every_exported_optimizer_has_a_race_recipe():
    classes = {name: getattr(optimfx, name) for name in optimfx.__all__}
    exported = {name for name, obj in classes.items()
                if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)}
    exported.add("Funnel")  # a factory function returning an EGStepSize
    assert exported <= set(registry.all_contenders())
    # and nothing is offered that optimfx does not export
    offered = {c.name for c in registry.all_contenders().values() if c.family == "optimfx"}
    assert offered <= set(optimfx.__all__)


def test_no_command_means_bench_and_params_scale_the_preset(tmp_path, capsys):
    assert main([*TINY, "--params", "2k", "--optimizers", "torch.Adam:single", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("optimfx bench:")
    n_params = int(first.split()[2].replace(",", ""))
    assert 1500 <= n_params <= 2500


def test_list(capsys):
    assert main(["bench", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("torch.Adam:single", "torch.Adam:foreach", "torch.Adam:fused", "torch.Adafactor:single",
                 "torch.Adafactor:foreach", "AdaX:auto", "AdaXW:auto", "AdaX:compiled", "ChildTuning:auto",
                 "EGStepSize:auto", "Funnel:auto"):
        assert name in out
    races = out[out.index("race contenders:"):]
    for name in ("torch.Adam", "torch.Adafactor", "AdaFactor", "Funnel", "EGStepSize"):
        assert f"  {name} " in races


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "optimfx", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: optimfx")
    assert "bench" in proc.stdout


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--params", "--preset", "--optimizers", "--device", "--steps", "--out", "--race-steps",
                   "--seed", "--no-plot", "--no-progress"):
        assert option in out


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "argument --steps: 1 is too few steps"),
    (["--steps", "many"], "argument --steps: invalid int value 'many'"),
    (["--params", "-5"], "argument --params: invalid count '-5'"),
    (["--params", "lots"], "argument --params: invalid count 'lots'"),
    (["--params", "0"], "argument --params: invalid count '0'"),
    (["--preset", "resnet"], "argument --preset: invalid choice: 'resnet'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--device", "meta"], "argument --device: unsupported device type 'meta'"),
    (["--device", "not a device"], "argument --device: invalid device 'not a device'"),
    (["--optimizers", "Nadam"], "argument --optimizers: unknown name 'Nadam'"),
    (["--race-steps", "-1"], "argument --race-steps: -1 must be at least 0"),
    (["--race-steps", "few"], "argument --race-steps: invalid int value 'few'"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--optimizers", ","], "argument --optimizers: empty list"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: optimfx bench" in err
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "argument --device: CUDA is not available" in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "report.json"
    target.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(target)])
    assert exc.value.code == 2
    assert "argument --out:" in capsys.readouterr().err


@pytest.mark.parametrize("module, message, escape", [
    ("matplotlib", "matplotlib is not installed", "--no-plot"),
    ("sklearn", "scikit-learn is not installed", "--race-steps 0"),
])
def test_missing_optional_dependency_fails_early_with_the_fix(module, message, escape, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setitem(sys.modules, module, None)  # makes ``import <module>`` raise ImportError
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--preset", "smoke", "--race-steps", "5", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "pip install 'optimfx[bench]'" in err and escape in err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_timed_implementations_run_as_they_race():
    """The wrappers are timed around the optimizer they race with, and ChildTuningAdamW with the
    race's F mode, so each row's time and race figures belong to the same optimizer."""
    impls = registry.all_impls()
    params = [torch.zeros(4, requires_grad=True)]
    ct = impls["ChildTuningAdamW:auto"].factory(params)
    assert (ct.param_groups[0]["child_tuning_mode"], ct.param_groups[0]["reserve_p"]) == ("F", 0.3)
    adapter = impls["ChildTuning:auto"].factory(params)
    assert type(adapter.base) is torch.optim.Adam and adapter.param_groups[0]["child_tuning_mode"] == "F"
    eg = impls["EGStepSize:auto"].factory(params)
    assert type(eg.base) is torch.optim.Adam and eg.param_groups[0]["lr"] == registry.BENCH_LR
    assert type(impls["Funnel:auto"].factory(params).base) is torch.optim.SGD


def test_a_busy_cpu_is_said_next_to_the_table():
    from optimfx.bench import report

    env = {"device": "cpu", "cpu_count": 2, "loadavg": [0.4, 0.5, 0.6], "loadavg_end": [3.6, 1.0, 1.0]}
    assert report.busy_note(env).startswith("note: the load average was 0.4 and 3.6 on 2 CPUs")
    assert report.busy_note({**env, "loadavg_end": [1.9, 1.0, 1.0]}) is None
    assert report.busy_note({**env, "device": "cuda", "loadavg_end": [9.0, 9.0, 9.0]}) is None
    assert report.busy_note({**env, "loadavg": None, "loadavg_end": None}) is None
