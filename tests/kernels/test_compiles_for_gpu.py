"""The kernels a single-device step launches compile for an H100 (``sm_90``), without a GPU.

The interpreter runs the kernels' Python, never the compiler; ``_compile_for_gpu.py`` runs the
optimizers with Triton's whole compilation pipeline (down to ``ptxas``) in place of the launches,
in a fresh process without ``TRITON_INTERPRET``. Skipped where the installed Triton has no NVIDIA
backend or ``ptxas``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("_compile_for_gpu.py")


def _has_nvidia_backend() -> bool:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas.exists() and os.access(ptxas, os.X_OK)


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend (ptxas)")
def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n\n".join(f"{f['kernel']}:\n{f['error']}" for f in report["failures"])
    # every kernel the five optimizer families launch on one device
    expected = {"adamw_step_kernel", "adax_step_kernel", "nonfinite_flag_kernel", "unscale_kernel",
                "eg_partials_kernel",
                "eg_reduce_kernel", "eg_scale_kernel", "eg_apply_kernel", *(
                    f"adafactor_{p}_kernel" for p in ("rowcol", "stats", "rms", "scale", "apply"))}
    assert expected <= set(report["compiled"])
