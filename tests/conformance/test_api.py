"""The ``torch.optim.Optimizer`` API contract: errors, repr, groups, closure, maximize, lr, hooks, copies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from _harness import (assert_runs_equal, clone_params, make_grads, make_params, model_and_data, require, run,
                      steps_taken, train)
from optim_db import OPTIMIZERS, common_error_inputs, rows, rows_x_backends

ERROR_CASES = [pytest.param(r, e, id=f"{r.id}-{e.desc}")
               for r in OPTIMIZERS for e in r.error_inputs() + common_error_inputs()]


@pytest.mark.parametrize("row, case", ERROR_CASES)
def test_errors(row, case):
    params = case.params() if case.params is not None else [torch.nn.Parameter(torch.randn(3))]
    if case.on_step is None:
        with pytest.raises(case.error_type, match=case.regex):
            row.make(params, **case.kwargs)
        return
    opt = row.make(params, **case.kwargs)
    params[0].grad = case.on_step(params[0])
    with pytest.raises(case.error_type, match=case.regex):
        opt.step()


@pytest.mark.parametrize("row", rows())
def test_repr_lists_every_hyperparameter(row):
    text = repr(row.make(make_params([(2,)])))
    assert text.startswith(row.name)
    for key in row.make(make_params([(2,)])).defaults:
        assert f"{key}: " in text


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_closure_is_called_once_and_its_loss_returned(row, backend, device):
    require(backend, device)
    model, x, y = model_and_data(device)
    opt = row.make(model.parameters(), backend)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None
    assert opt.step(closure=None) is None


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_maximize_is_descent_on_the_negated_gradient(row, backend, device):
    require(backend, device)
    up, down = make_params([(6, 4), (3,)], device), make_params([(6, 4), (3,)], device)
    grads = make_grads(up, 4)
    opt_up = row.make(up, backend, maximize=True, weight_decay=1e-2)
    opt_down = row.make(down, backend, weight_decay=1e-2)
    run(opt_up, up, grads)
    run(opt_down, down, [[-g for g in gs] for gs in grads])
    assert_runs_equal(opt_up, up, opt_down, down)


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_maximize_raises_the_loss(row, backend, device):
    require(backend, device)
    model, x, y = model_and_data(device)
    opt = row.make(model.parameters(), backend, maximize=True)
    losses = train(model, opt, x, y, 20)
    assert losses[-1] > losses[0]


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_param_groups_behave_like_separate_optimizers(row, backend, device):
    require(backend, device)
    a, b = make_params([(6, 4), ()], device), make_params([(5,)], device, seed=1)
    a2, b2 = clone_params(a), clone_params(b)
    ga, gb = make_grads(a, 4), make_grads(b, 4, seed=2)
    hyper_a, hyper_b = dict(lr=1e-2, weight_decay=0.0), dict(lr=3e-3, weight_decay=0.1)
    together = row.make([dict(params=a, **hyper_a), dict(params=b, **hyper_b)], backend)
    run(together, a + b, [x + y for x, y in zip(ga, gb)])
    opt_a, opt_b = row.make(a2, backend, **hyper_a), row.make(b2, backend, **hyper_b)
    run(opt_a, a2, ga)
    run(opt_b, b2, gb)
    assert_runs_equal(together, a, opt_a, a2)
    assert_runs_equal(together, b, opt_b, b2)


SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "LambdaLR-warmup": lambda opt: lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4)),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_lr_scheduler_drives_lr_and_is_never_overwritten(row, backend, sched, device):
    require(backend, device)
    params, fixed, manual = (make_params([(6, 4), ()], device) for _ in range(3))
    grads = make_grads(params, 6)
    opt = row.make(params, backend)
    scheduler = SCHEDULERS[sched](opt)
    used = []
    for t, gs in enumerate(grads):
        lr_before = opt.param_groups[0]["lr"]
        used.append(lr_before)
        run(opt, params, [gs])
        assert opt.param_groups[0]["lr"] == lr_before
        scheduler.step(float(t)) if sched == "ReduceLROnPlateau" else scheduler.step()
    assert len(set(used)) > 1
    # the same lrs set by hand give the same run; a constant lr does not
    opt_manual = row.make(manual, backend)
    for lr, gs in zip(used, grads):
        opt_manual.param_groups[0]["lr"] = lr
        run(opt_manual, manual, [gs])
    assert_runs_equal(opt, params, opt_manual, manual)
    run(row.make(fixed, backend), fixed, grads)
    assert not torch.equal(fixed[0], params[0])


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_tensor_lr_equals_float_lr(row, backend, device):
    require(backend, device)
    lr = 2.0**-7  # exact in fp32, so the tensor holds the same number as the float
    as_float, as_tensor = make_params([(6, 4), ()], device), make_params([(6, 4), ()], device)
    grads = make_grads(as_float, 3)
    lr_t = torch.tensor(lr, device=device)
    opt_f, opt_t = row.make(as_float, backend, lr=lr), row.make(as_tensor, backend, lr=lr_t)
    run(opt_f, as_float, grads)
    run(opt_t, as_tensor, grads)
    assert_runs_equal(opt_f, as_float, opt_t, as_tensor)
    assert opt_t.param_groups[0]["lr"] is lr_t and float(lr_t) == lr


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_step_hooks_fire_once_in_torch_order(row, backend, device):
    require(backend, device)
    for other in OPTIMIZERS:  # a parent class hooked earlier must not make hooks fire twice
        other.make(make_params([(2,)]))
    params = make_params([(3,)], device)
    opt = row.make(params, backend)
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda *_: seen.append("global pre")),
        opt.register_step_pre_hook(lambda *_: seen.append("pre")),
        opt.register_step_post_hook(lambda *_: seen.append("post")),
        register_optimizer_step_post_hook(lambda *_: seen.append("global post")),
    ]
    try:
        for _ in range(2):
            params[0].grad = torch.ones_like(params[0])
            opt.step(lambda: seen.append("step"))
    finally:
        for h in handles:
            h.remove()
    assert seen == ["global pre", "pre", "step", "post", "global post"] * 2
    opt.step()
    assert len(seen) == 10


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_deepcopy_keeps_attributes_and_continues_identically(row, backend, device):
    require(backend, device)
    params = make_params([(6, 4), (5,), ()], device)
    grads = make_grads(params, 4)
    opt = row.make(params, backend)
    run(opt, params, grads[:2])
    params2, opt2 = copy.deepcopy((params, opt))
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(opt2) if not k.startswith("_")}
    # torch's __setstate__ may add keys (``differentiable``); every original value must survive
    assert {k: opt2.defaults[k] for k in opt.defaults} == opt.defaults
    # the optimizer's own checkpoint hooks survive the copy (pickling drops registered hooks)
    for hooks in ("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                  "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
        assert list(getattr(opt2, hooks).values()) == list(getattr(opt, hooks).values()), hooks
    run(opt, params, grads[2:])
    run(opt2, params2, grads[2:])
    assert_runs_equal(opt, params, opt2, params2)


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_state_is_non_empty_after_a_step(row, backend, device):
    require(backend, device)
    params = make_params([(6, 4), (0,), ()], device)
    opt = row.make(params, backend)
    run(opt, params, make_grads(params, 1))
    for p in params:
        assert len(opt.state[p]) > 1
    assert steps_taken(row, opt, params) in (None, [1] * len(params))
