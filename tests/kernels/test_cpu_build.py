"""Building and loading the CPU kernels: a cached library per source and compiler, and a clear
fallback to the plain-PyTorch path where no library can be had (checked in fresh processes, so the
state of this one does not leak in)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimfx._kernels import cpu_build

_PROBE = textwrap.dedent("""
    import torch, optimfx
    from optimfx._kernels import cpu_adam, cpu_build
    print(cpu_adam.available(), '|', cpu_build.unavailable_reason('cpu_adam'))
    p = torch.nn.Parameter(torch.randn(3000))
    opt = optimfx.AdamW([p], lr=1e-2, child_tuning_mode='F', reserve_p=0.5)
    p.grad = torch.randn(3000)
    opt.step()
    print(bool(p.isfinite().all()))
""")


def _probe(tmp_path, **env) -> list[str]:
    full = {**os.environ, "OPTIMFX_CACHE_DIR": str(tmp_path / "cache"), **env}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C compiler")
def test_library_is_built_once_into_the_cache_and_reused(tmp_path):
    lines = _probe(tmp_path)
    assert lines[0].startswith("True") and lines[1] == "True"
    built = sorted((tmp_path / "cache").glob("cpu_adam-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _probe(tmp_path)[0].startswith("True")
    assert sorted((tmp_path / "cache").glob("cpu_adam-*.so")) == built
    assert built[0].stat().st_mtime_ns == stamp
    # nothing left behind by the build (its temporary directory is gone)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [built[0].name]


@pytest.mark.skipif(cpu_build.compiler() is None or not cpu_build.enabled(), reason="no C compiler, or disabled")
@pytest.mark.parametrize("name", sorted(p.stem for p in Path(cpu_build.__file__).parent.glob("*.c")))
def test_every_kernel_builds_where_a_compiler_is(name):
    """Each kernel's tests skip where its library is not available: a kernel that stopped compiling
    would show only as skipped tests. Where a compiler is, every ``<name>.c`` must build and load."""
    module = importlib.import_module(f"optimfx._kernels.{name}")
    assert module.available(), cpu_build.unavailable_reason(name)


@pytest.mark.parametrize("env, reason", [
    ({"CC": "/nonexistent/cc", "PATH": "/nonexistent"}, "no C compiler found"),
    ({"OPTIMFX_CPU_KERNELS": "0"}, "OPTIMFX_CPU_KERNELS=0"),
])
def test_without_a_library_the_step_takes_the_pytorch_path(tmp_path, env, reason):
    lines = _probe(tmp_path, **env)
    assert lines[0].startswith(f"False | {reason}")
    assert lines[1] == "True"
    assert not list((tmp_path / "cache").glob("*.so")) if (tmp_path / "cache").exists() else True


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C compiler")
def test_a_compile_error_is_reported_not_raised(tmp_path, monkeypatch):
    (tmp_path / "broken.c").write_text("this is not C\n")
    monkeypatch.setattr(cpu_build, "_SOURCES", tmp_path)
    monkeypatch.setenv("OPTIMFX_CACHE_DIR", str(tmp_path / "cache"))
    assert cpu_build.load("broken") is None
    assert "compiling broken.c failed" in cpu_build.unavailable_reason("broken")
