"""Fail the docs build when a public symbol of ``optimfx`` has no API entry.

After all pages are read, every name in ``optimfx.__all__`` must be a Python object described on some
page (``autoclass``/``autofunction``/``autodata`` or a ``py:`` directive) as ``optimfx.<name>``.
A missing one is a warning of type ``optimfx.api-coverage``: an error under ``sphinx-build -W``.
The idea is optax's ``coverage_check`` builder, done as a consistency check of the normal build.
"""

from __future__ import annotations

import importlib
from typing import Any

from sphinx.util import logging

logger = logging.getLogger(__name__)


def undocumented(package: str, documented: set[str]) -> list[str]:
    """Names in ``package.__all__`` with no object description ``package.<name>``."""
    module = importlib.import_module(package)
    return [name for name in module.__all__ if f"{package}.{name}" not in documented]


def check_public_api(app: Any, env: Any) -> None:
    documented = set(env.get_domain("py").objects)
    for package in app.config.api_coverage_packages:
        for name in undocumented(package, documented):
            logger.warning("%s.%s is in %s.__all__ but has no API entry in the docs "
                           "(add an autoclass/autofunction/autodata for it)", package, name, package,
                           type="optimfx", subtype="api-coverage")


def setup(app: Any) -> dict[str, Any]:
    app.add_config_value("api_coverage_packages", [], "env", types=frozenset({list, tuple}))
    app.connect("env-check-consistency", check_public_api)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
