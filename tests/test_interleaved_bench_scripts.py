"""The interleaved CPU benchmark scripts (``python -m benches.<name>``) end to end on shrunken presets:
every contender steps and is timed every round; the numbers themselves are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "adafactor_cpu": {"optimfx", "transformers", "torch:single", "torch:foreach"},
    "adam_family_cpu": {"AdaX", "AdaX per-tensor", "AdamW", "torch.Adam:fused"},
    "child_tuning_cpu": {"AdamW off", "AdamW F", "AdamW D per-tensor masks", "AdaXW F per-tensor masks"},
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_times_every_contender(script, tmp_path):
    out = tmp_path / "times.json"
    run = subprocess.run([sys.executable, "-m", f"benches.{script}", "--presets", "many-small", "--scale",
                          "0.002", "--rounds", "2", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    times = json.loads(out.read_text())["presets"]["many-small"]
    if script == "adafactor_cpu" and "transformers" not in times:
        pytest.fail("transformers is a test dependency; its Adafactor should be a contender")
    assert SCRIPTS[script] <= set(times)
    assert all(len(ts) == 2 and min(ts) > 0 for ts in times.values())
    assert "| contender |" in run.stdout


def test_adafactor_pass_timer_times_every_pass_of_every_mode(tmp_path):
    """``benches.adafactor_cpu_passes``: each mode's steps and the kernel passes inside them."""
    from optimfx._kernels import cpu_adafactor

    if not cpu_adafactor.available():
        pytest.skip("the AdaFactor C kernel is not built here")
    out = tmp_path / "times.json"
    run = subprocess.run([sys.executable, "-m", "benches.adafactor_cpu_passes", "--presets", "many-small", "--scale",
                          "0.002", "--rounds", "2", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    times = json.loads(out.read_text())["presets"]["many-small"]
    assert set(times) == {"off", "F", "D"}
    for mode in times.values():
        assert {"step", "pass 1", "pass 3"} <= set(mode)
        assert all(len(ts) == 2 and min(ts) > 0 for ts in mode.values())
    assert "| D |" in run.stdout
