"""Every backend against the reference: the reference backend *is* the algorithm's reference step, and
the fast backends match it on a small model at the tolerance from ``tolerances.py``."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from _harness import SHAPES, assert_runs_close, make_grads, make_params, model_and_data, require, run, train
from optim_db import rows_x_backends, rows_x_inputs
from plain_reference import use_plain_reference
from optimfx._precision import real_view

STEPS = 5


@pytest.mark.parametrize("row, backend, inp", rows_x_inputs(("reference",)))
def test_reference_backend_runs_the_algorithms_reference_step(row, backend, inp):
    """The step skeleton (lazy state, step counting, hyperparameters, lr) adds nothing to the maths:
    driving the algorithm's group step (when it has one) and ``reference_step`` by hand gives the
    same bits. (Each group step is tested against ``reference_step`` in ``tests/reference``.)"""
    algo = row.cls.algorithm
    params = make_params(SHAPES)
    by_hand = make_params(SHAPES)
    grads = make_grads(params, STEPS)
    opt = row.make(params, backend, **inp.kwargs)
    run(opt, params, grads)
    group = opt.param_groups[0]
    hyper = algo.hyper(group)
    lr = float(group["lr"])  # the dispatcher reads a tensor lr on the host
    states = [{"step": torch.zeros((), dtype=torch.int64), **algo.init_state(real_view(p), hyper)}
              for p in by_hand]
    scalars_of = lambda step: algo.scalars(step, hyper)  # noqa: E731
    with torch.no_grad():
        for t, gs in enumerate(grads, start=1):
            ps, gs = [real_view(p) for p in by_hand], [real_view(g) for g in gs]
            for state in states:
                state["step"] += 1
            todo = range(len(ps))
            if algo.group_step is not None:
                todo = algo.group_step(ps, gs, states, [t] * len(ps), hyper, lr, scalars_of)
            for i in todo:
                algo.reference_step(ps[i], gs[i], states[i], hyper, scalars_of(t), lr)
    for p, q, state in zip(params, by_hand, states):
        assert torch.equal(p.detach(), q.detach())
        assert opt.state[p].keys() == state.keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def _model_run(row, backend, kwargs, device):
    model, x, y = model_and_data(device)
    opt = row.make(model.parameters(), backend, **kwargs)
    train(model, opt, x, y, STEPS)
    return opt, list(model.parameters())


def _assert_matches_reference(row, backend, kwargs, device):
    """``backend`` against the plain-PyTorch reference step (the reference backend's own CPU fast
    paths off: ``tests/plain_reference.py``)."""
    opt, params = _model_run(row, backend, kwargs, device)
    with pytest.MonkeyPatch.context() as m:
        use_plain_reference(m)
        ref_opt, ref_params = _model_run(row, "reference", kwargs, device)
    assert_runs_close(opt, params, ref_opt, ref_params, row.tolerance)


@pytest.mark.parametrize("row, backend, inp", rows_x_inputs(("triton",)))
def test_triton_matches_reference_on_a_model(row, backend, inp, device):
    require(backend, device)
    _assert_matches_reference(row, backend, inp.kwargs, device)


@pytest.mark.parametrize("row, backend", rows_x_backends(("compiled",)))
def test_compiled_matches_reference_on_a_model(row, backend, device):
    _assert_matches_reference(row, backend, dict(weight_decay=1e-2), device)


# ten distinct shapes, ranks 0-3: more than Dynamo's recompile limit (8) if each shape took a graph
MANY_SHAPES = [(6, 4), (8,), (3, 5), (), (4, 4, 2), (10, 3), (7,), (2, 9), (5, 5), (11,)]


@pytest.mark.parametrize("lr_kind", ["float-with-scheduler", "tensor"])
@pytest.mark.parametrize("row, backend", rows_x_backends(("compiled",)))
def test_compiled_backend_stops_compiling_after_warm_up(row, backend, lr_kind, device):
    """After the first step the compiled step has seen every rank and the step scalars as graph
    inputs; later steps, whose step count and (scheduled) lr change, reuse its graphs. Shapes are
    dynamic, so ten shapes stay under Dynamo's recompile limit (``fail_on_recompile_limit_hit``: a
    silent fall-back to eager would fail here), and the result is the reference's."""
    runs = {b: make_params(MANY_SHAPES, device) for b in (backend, "reference")}
    grads = make_grads(runs[backend], 5)
    lr = 1e-2 if lr_kind == "float-with-scheduler" else torch.tensor(1e-2)
    opts = {b: row.make(ps, b, lr=lr, weight_decay=1e-2) for b, ps in runs.items()}
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1.0 + t)) for o in opts.values()]
    graphs = []
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step_grads in grads:
            for b, ps in runs.items():
                run(opts[b], ps, [step_grads])
            for s in schedulers:
                s.step()
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[1]] * (len(graphs) - 1), f"graphs after each step: {graphs}"
    assert_runs_close(opts[backend], runs[backend], opts["reference"], runs["reference"], row.tolerance)
