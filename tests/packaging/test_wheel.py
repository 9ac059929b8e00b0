"""The built distributions ship ``kernels/`` as ``optimfx._kernels`` and nothing at the top level."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("build")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("optimfx-*.whl")
    return wheel


def test_wheel_layout(dist):
    names = zipfile.ZipFile(_wheel(dist)).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "optimfx/_kernels/__init__.py" in names
    assert "optimfx/_kernels/adax.py" in names and "optimfx/_kernels/_launcher.py" in names
    # the CPU kernels' sources, compiled where the package is used
    assert {"optimfx/_kernels/cpu_adam.c", "optimfx/_kernels/cpu_adafactor.c", "optimfx/_kernels/cpu_eg.c",
            "optimfx/_kernels/cpu_common.h"} <= set(names)
    assert "optimfx/py.typed" in names
    assert "kernels" not in top_level and "tests" not in top_level and "benches" not in top_level
    assert not any(n.endswith(".pyc") for n in names)


def test_sdist_has_kernels_sources(dist):
    import tarfile

    (sdist,) = dist.glob("optimfx-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    assert any(n.endswith("/kernels/adax.py") for n in names)
    assert any(n.endswith("/LICENSE") for n in names)


def test_twine_check(dist):
    pytest.importorskip("twine")
    files = [str(p) for p in dist.iterdir()]
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_installs_and_imports_outside_the_checkout(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(_wheel(dist))],
                   check=True, capture_output=True)
    # the installed distribution's own files: a PyPI package named ``kernels`` (a dependency of
    # recent transformers) may sit in the same site-packages, and is not ours
    code = ("import optimfx, optimfx._kernels, importlib.metadata, torch;"
            "tops = {f.parts[0] for f in importlib.metadata.files('optimfx')};"
            "assert 'kernels' not in tops and 'optimfx' in tops, tops;"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3);"
            "optimfx.AdaXW([p]).step(); print(optimfx.__file__)")
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert str(env_dir) in out.stdout


def test_installed_wheel_builds_its_cpu_kernels(dist, tmp_path):
    from optimfx._kernels import cpu_build

    if cpu_build.compiler() is None:
        pytest.skip("no C compiler")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(_wheel(dist))],
                   check=True, capture_output=True)
    code = "from optimfx._kernels import cpu_build; print(cpu_build.__file__); print(cpu_build.status())"
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True,
                         env={**os.environ, "OPTIMFX_CACHE_DIR": str(tmp_path / "cache")})
    assert str(env_dir) in out.stdout.splitlines()[0]
    assert out.stdout.splitlines()[1] == "{'cpu_adam': 'ready', 'cpu_adafactor': 'ready', 'cpu_eg': 'ready'}"


def test_a_source_checkout_imports_its_kernels():
    """Run from the repository root without an installed optimfx (``python -m optimfx bench`` in a
    checkout after a regular install imports the checkout's ``optimfx/``): ``kernels/`` is
    ``optimfx._kernels`` there too, and the CPU kernels load from it."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()"
            " and 'editable' not in type(f).__name__.lower()];"
            f"sys.path.insert(0, {str(ROOT)!r});"
            "import optimfx, optimfx._kernels as k; from optimfx._kernels import cpu_build;"
            "print(optimfx.__file__); print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    lines = out.stdout.splitlines()
    assert lines[0] == str(ROOT / "optimfx" / "__init__.py")
    assert lines[1] == str(ROOT / "kernels" / "__init__.py")
