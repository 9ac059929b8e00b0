"""The documentation site: it builds with warnings as errors, and every Python snippet it shows runs.

* The Sphinx build (``-W --keep-going``) fails on any warning, including a name in ``optimfx.__all__``
  without an API entry (``docs/_ext/api_coverage.py``) and LaTeX the MathML converter rejects.
* Python code appears on the pages only through ``literalinclude`` of scripts under ``docs/``; each
  script is executed here, and its assertions are part of the recipe.
* The examples in public docstrings (rendered on the API pages) are run as doctests.
* The built pages load nothing from the network (math is MathML rendered at build time).
"""

from __future__ import annotations

import doctest
import importlib.util
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimfx

DOCS = Path(__file__).resolve().parents[2] / "docs"
SCRIPTS = sorted(p for p in DOCS.rglob("*.py") if not any(part.startswith("_") for part in p.relative_to(DOCS).parts)
                 and p.name != "conf.py")
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
#: scripts that need a package outside the ``test`` extra: skipped without it
SCRIPT_NEEDS = {"drop_in_hf_checkpoint.py": "transformers"}
#: public docstring examples that are not self-contained (fix the docstring, then remove the entry)
DOCTEST_KNOWN_BROKEN: dict[str, str] = {}
BUILD_DEPS = ("sphinx", "furo", "myst_parser", "math_core")


@pytest.fixture(scope="module", autouse=True)
def _site_build(tmp_path_factory: pytest.TempPathFactory):
    """Start the Sphinx build in the background; the scripts and doctests run meanwhile."""
    missing = [m for m in BUILD_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        yield f"docs toolchain not installed ({', '.join(missing)}): pip install -e '.[docs]'"
        return
    root = tmp_path_factory.mktemp("docs")
    out, log = root / "html", root / "sphinx.log"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield proc, out, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def built_site(_site_build) -> Path:
    if isinstance(_site_build, str):
        pytest.skip(_site_build)
    proc, out, log = _site_build
    returncode = proc.wait(timeout=300)
    assert returncode == 0, f"sphinx-build -W failed:\n{log.read_text()}"
    return out


def _literalincludes(page: Path) -> list[Path]:
    text = page.read_text(encoding="utf-8")
    return [(page.parent / m).resolve() for m in re.findall(r"```\{literalinclude\}\s+(\S+)", text)]


def test_shown_python_is_executed_python() -> None:
    included = set()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = re.findall(r"^(?:```|:::)\s*(?:\{code-block\}\s*)?(python|py|pycon|ipython)\s*$", text, re.M)
        assert not fences, (f"{page.relative_to(DOCS)}: show Python through a literalinclude of a script "
                            "under docs/ (executed by this test), not an inline code block")
        for target in _literalincludes(page):
            assert target.is_file(), f"{page.relative_to(DOCS)} includes a missing file {target}"
            included.add(target)
    orphans = [s.relative_to(DOCS) for s in SCRIPTS if s.resolve() not in included]
    assert not orphans, f"scripts shown on no page: {orphans}"


@pytest.fixture
def one_thread():
    """The snippets use tiny tensors: intra-op threads only add contention (with the background
    build on a 2-core CI machine, a 100-step example took 13 s with 2 threads, 0.4 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_script_runs(script: Path, one_thread: None) -> None:
    needed = SCRIPT_NEEDS.get(script.name)
    if needed is not None:
        pytest.importorskip(needed, reason=f"{script.name} needs {needed}")
    runpy.run_path(str(script), run_name="__main__")


def _public_doctests() -> list:
    finder = doctest.DocTestFinder(recurse=False)
    tests = []
    for name in optimfx.__all__:
        obj = getattr(optimfx, name)
        if not callable(obj):
            continue
        for test in finder.find(obj, name, globs={"torch": torch, "optimfx": optimfx}):
            if test.examples:
                marks = ()
                if name in DOCTEST_KNOWN_BROKEN:
                    marks = (pytest.mark.xfail(reason=DOCTEST_KNOWN_BROKEN[name], strict=True),)
                tests.append(pytest.param(test, id=test.name, marks=marks))
    return tests


@pytest.mark.parametrize("test", _public_doctests())
def test_docstring_example_runs(test: doctest.DocTest, one_thread: None) -> None:
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(test, out=report.append, clear_globs=True)
    assert result.failed == 0, "".join(report)


def test_site_builds_without_warnings(built_site: Path) -> None:
    for page in PAGES:
        html = built_site / page.relative_to(DOCS).with_suffix(".html")
        assert html.is_file(), f"{page.name} was not built"


def test_math_is_server_side_and_nothing_is_remote(built_site: Path) -> None:
    pages = {p: p.read_text(encoding="utf-8") for p in built_site.rglob("*.html")}
    for path, html in pages.items():
        remote = re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"', html)
        assert not remote, f"{path.name} loads remote assets: {remote}"
        assert not re.search(r"<script[^>]*mathjax|window\.MathJax", html, re.I), f"{path.name} loads MathJax"
    adafactor = pages[built_site / "optimizers" / "adafactor.html"]
    assert adafactor.count("<math") > 20 and "math-error" not in adafactor


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_renders_in_headless_chromium(built_site: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium (apt-get install chromium)")
    page = built_site / "optimizers" / "adafactor.html"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<title>AdaFactor" in dom and "<math" in dom
    assert 'class="sig-name descname"' in dom  # the autodoc entry of the class
