"""``optimfx bench`` end to end on a tiny workload, and its argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from optimfx.cli import main

# a tiny workload: the smoke preset, a 16 MiB roof, three rounds
TINY = ["--preset", "smoke", "--steps", "3", "--roof-mib", "16", "--device", "cpu"]


def test_bench_table_and_json_report(tmp_path, capsys):
    rc = main(["bench", *TINY, "--optimizers", "AdaX,torch.Adam:fused", "--out", str(tmp_path)])
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


def test_no_command_means_bench_and_params_scale_the_preset(capsys):
    assert main([*TINY, "--params", "2k", "--optimizers", "torch.Adam:single"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("optimfx bench:")
    n_params = int(first.split()[2].replace(",", ""))
    assert 1500 <= n_params <= 2500


def test_list(capsys):
    assert main(["bench", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("torch.Adam:single", "torch.Adam:foreach", "torch.Adam:fused", "AdaX:auto",
                 "AdaXW:auto", "AdaX:compiled"):
        assert name in out


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
    for option in ("--params", "--preset", "--optimizers", "--device", "--steps", "--out"):
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
    (["--optimizers", "Nadam"], "argument --optimizers: unknown implementation 'Nadam'"),
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
