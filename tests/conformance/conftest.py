"""Conformance-suite fixtures: each compiled-backend test starts Dynamo from scratch.

The compiled backend recompiles for every new shape and every step (its per-step scalars are
specialised), and Dynamo silently falls back to eager once ``recompile_limit`` (8) graphs exist for
a function. A compiled test that ran after that limit would compare the reference with itself, so
each one resets Dynamo, raises the limit, and turns hitting it into an error.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo(request: pytest.FixtureRequest):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "compiled":
        yield
        return
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()
