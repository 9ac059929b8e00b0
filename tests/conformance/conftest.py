"""Conformance-suite fixtures: each compiled-backend test starts Dynamo from scratch; a row's ``skips``.

The compiled backend recompiles for every new shape and every step (its per-step scalars are
specialised), and Dynamo silently falls back to eager once ``recompile_limit`` (8) graphs exist for
a function. A compiled test that ran after that limit would compare the reference with itself, so
each one resets Dynamo, raises the limit, and turns hitting it into an error.

A generic test listed in an ``optim_db`` row's ``skips`` is skipped for that row, with the row's reason.
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        row = params.get("row")
        if row is None:
            continue
        reason = row.skips.get(item.originalname)
        case = params.get("case")
        if reason is None and hasattr(case, "error_type"):
            reason = row.skips.get(f"{item.originalname}: {case.desc}")
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"{row.id}: {reason}"))
