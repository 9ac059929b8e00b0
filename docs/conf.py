"""Sphinx configuration for the optimfx documentation.

Build (warnings are errors, as in CI's ``tests/docs/test_docs.py``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Everything here works offline: no intersphinx inventories are fetched, math is rendered to MathML at
build time (``_ext/mathml.py``), so the pages load no script from a CDN, and the benchmark figures
are drawn with matplotlib from the committed ``benches/results/*.json`` (``_ext/benchmarks.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import optimfx

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "optimfx"
author = "optimfx developers"
copyright = "optimfx developers"  # noqa: A001
release = optimfx.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "mathml",
    "api_coverage",
    "benchmarks",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "**/__pycache__"]

# -- MyST -------------------------------------------------------------------------------------------
# ``$…$`` / ``$$…$$`` math, ``:::`` fences for admonitions, heading anchors for ``[](#...)`` links
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc / napoleon -----------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# every name in these packages' ``__all__`` must have an API entry (``_ext/api_coverage.py``)
api_coverage_packages = ["optimfx"]

# -- benchmark figures (``_ext/benchmarks.py``): drawn at build time from the committed results ----
benchmark_results_dir = "../benches/results"

# -- HTML -------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"optimfx {release}"
html_math_renderer = "mathml"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_copy_source = False
html_show_sourcelink = False
