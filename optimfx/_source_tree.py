"""``optimfx._kernels`` when optimfx runs from a source checkout.

An installed optimfx has ``optimfx/_kernels/`` (the repository's ``kernels/``, mapped by
``pyproject.toml``). Run from the repository root (``python -m optimfx bench`` in a checkout), Python
imports the checkout's ``optimfx/`` first, which has no ``_kernels``: the checkout's ``kernels/``
is then registered under that name, so the same modules load from the same sources.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def register_kernels() -> None:
    """Make ``optimfx._kernels`` importable: the installed package's, else the checkout's ``kernels/``."""
    if importlib.util.find_spec("optimfx._kernels") is not None:
        return
    kernels = Path(__file__).resolve().parent.parent / "kernels"
    init = kernels / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location("optimfx._kernels", init, submodule_search_locations=[str(kernels)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["optimfx._kernels"] = module
    spec.loader.exec_module(module)
