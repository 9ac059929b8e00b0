"""Convergence on a quadratic and on Rosenbrock: a sanity check of the reference backend, plus the
correctness claim for every other backend, which is to follow the reference's trajectory.

"The loss went down" alone is not a correctness test for an optimizer that has a reference, so the
fast backends are compared with the reference iterate; the reference's own descent is the sanity
check (optax ``alias_test.py`` uses the same two problems).
"""

from __future__ import annotations

import pytest
import torch

from _harness import require
from optim_db import rows, rows_x_backends
from tolerances import assert_close

_A = torch.linspace(1.0, 10.0, 8)  # condition number 10
_X_STAR = torch.linspace(-1.0, 1.0, 8)


def _quadratic(x):
    return 0.5 * (_A.to(x.device) * (x - _X_STAR.to(x.device)).square()).sum()


def _rosenbrock(x):
    return (1 - x[0]).square() + 100 * (x[1] - x[0].square()).square()


# name: (loss, start, optimum, constructor keywords (a row may override them), steps to converge)
PROBLEMS = {
    "quadratic": (_quadratic, torch.zeros(8), _X_STAR, dict(lr=0.1, weight_decay=0.0), 100),
    "rosenbrock": (_rosenbrock, torch.tensor([-1.5, 2.0]), torch.ones(2), dict(lr=0.3, weight_decay=0.0), 400),
}


def _descend(row, backend, problem, steps, device):
    loss_fn, start, _, kwargs, _ = PROBLEMS[problem]
    x = torch.nn.Parameter(start.clone().to(device))
    opt = row.make([x], backend, **{**kwargs, **row.convergence.get(problem, {})})
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
    return x.detach()


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("row", rows())
def test_reference_converges(row, problem, device):
    _, start, optimum, _, steps = PROBLEMS[problem]
    x = _descend(row, "reference", problem, steps, device)
    assert (x.cpu() - optimum).norm() < 0.05 * (start - optimum).norm()


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("row, backend", rows_x_backends(("triton",)))
def test_backend_follows_the_reference_trajectory(row, backend, problem, device):
    """50 steps, at the 5-step tolerance: with gradients recomputed from the iterate, rounding
    differences would show up as drift; on these problems the iteration does not amplify them."""
    require(backend, device)
    x = _descend(row, backend, problem, 50, device)
    expected = _descend(row, "reference", problem, 50, device)
    assert_close(x, expected, row.tolerance, x.dtype)
