"""``add_param_group`` on a wrapper (:class:`optimfx.EGStepSize`, :class:`optimfx.ChildTuning`) adds the
group to its base too, with the base's defaults: the result equals a wrapper built with both groups."""

from __future__ import annotations

import pytest
import torch

import optimfx

BASES = {
    "adafactor": lambda groups: optimfx.AdaFactor(groups, lr=1e-2, relative_step=False),
    "adamw": lambda groups: optimfx.AdamW(groups, lr=1e-2),
    "torch-sgd": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
}
WRAPPERS = {
    "eg": lambda base: optimfx.EGStepSize(base, gamma_scale=0.1),
    "childtuning-f": lambda base: optimfx.ChildTuning(base, "F", 0.5, seed=2),
}


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5, 4), (4,), (3, 6), (6,))]


def _train(opt, params, steps=4):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("base", list(BASES))
def test_a_group_added_later_steps_as_one_given_at_construction(base, wrapper):
    given = _params()
    built = WRAPPERS[wrapper](BASES[base]([{"params": given[:2]}, {"params": given[2:], "weight_decay": 0.1}]))
    _train(built, given)

    added = _params()
    opt = WRAPPERS[wrapper](BASES[base]([{"params": added[:2]}]))
    opt.add_param_group({"params": added[2:], "weight_decay": 0.1})
    assert opt.param_groups is opt.base.param_groups and len(opt.param_groups) == 2
    new = opt.param_groups[1]
    assert set(built.param_groups[1]) == set(new)  # the base's defaults and the wrapper's
    assert new["weight_decay"] == 0.1
    _train(opt, added)
    for a, b in zip(given, added):
        assert torch.equal(a, b)


def test_a_parameter_already_in_a_group_is_refused_by_the_base():
    params = _params()
    opt = optimfx.EGStepSize(optimfx.AdamW(params[:2], lr=1e-2))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": params[1:3]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("base", list(BASES))
def test_defaults_are_the_bases_with_the_wrappers_on_top(base, wrapper):
    """Schedulers read ``optimizer.defaults`` (OneCycleLR/CyclicLR look for betas or momentum there,
    transformers' polynomial schedule for lr): a wrapper answers with its base's defaults, its own
    keys on top, and a copy keeps both."""
    import copy

    inner = BASES[base](_params())
    opt = WRAPPERS[wrapper](inner)
    for key, value in inner.defaults.items():
        if key not in opt.own_defaults:
            assert opt.defaults[key] == value
    assert all(opt.defaults[k] == v for k, v in opt.own_defaults.items())
    clone = copy.deepcopy(opt)
    assert clone.defaults == opt.defaults and clone.own_defaults == opt.own_defaults


@pytest.mark.parametrize("make", [
    lambda ps: optimfx.EGStepSize(torch.optim.Adam(ps, lr=1e-3)),
    lambda ps: optimfx.ChildTuning(torch.optim.SGD(ps, lr=0.1, momentum=0.9), "F", 0.5),
    lambda ps: optimfx.ChildTuning(optimfx.AdaXW(ps, lr=1e-3), "F", 0.5),
    lambda ps: optimfx.Funnel(ps),
], ids=["eg-adam", "childtuning-sgd", "childtuning-adaxw", "funnel"])
@pytest.mark.parametrize("scheduler", ["one-cycle", "cyclic"])
def test_cycling_schedulers_cycle_the_bases_momentum(make, scheduler):
    """OneCycleLR and CyclicLR with their default ``cycle_momentum=True`` run on the wrappers and
    cycle the momentum (or β1) the base reads from the shared groups."""
    params = _params()
    opt = make(params)
    if scheduler == "one-cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=6)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=2)
    key = "betas" if "betas" in opt.param_groups[0] else "momentum"
    seen = set()
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
        value = opt.base.param_groups[0][key]
        seen.add(value[0] if key == "betas" else value)
    assert len(seen) > 1 and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_transformers_polynomial_schedule_runs_on_wrappers(wrapper):
    transformers = pytest.importorskip("transformers")
    opt = WRAPPERS[wrapper](optimfx.AdamW(_params(), lr=1e-2))
    sched = transformers.get_scheduler("polynomial", opt, num_warmup_steps=1, num_training_steps=4)
    for _ in range(2):
        _train(opt, opt.param_groups[0]["params"], steps=1)
        sched.step()
    assert 0.0 < opt.param_groups[0]["lr"] < 1e-2  # past the warm-up, decaying


def test_eg_steps_a_group_added_to_its_base_directly():
    """A group added to the base after wrapping takes EG's defaults at the next step."""
    params = _params()
    base = torch.optim.SGD(params[:2], lr=0.1)
    opt = optimfx.EGStepSize(base, gamma_scale=0.1)
    base.add_param_group({"params": params[2:]})
    _train(opt, params, steps=2)
    assert opt.param_groups[1]["gamma_scale"] == 0.1
    assert all(opt.state[p]["gains"].ne(1.0).any() for p in params)


@pytest.mark.parametrize("wrap", [lambda b: optimfx.EGStepSize(b), lambda b: optimfx.ChildTuning(b, "F", 0.5)],
                         ids=["eg", "childtuning"])
def test_a_base_whose_step_needs_a_closure_is_refused(wrap):
    """LBFGS evaluates the loss and gradients again inside its step; a wrapper works on one
    evaluation's gradients and could only fail later with LBFGS's own missing-argument error."""
    with pytest.raises(TypeError, match=r"LBFGS\.step needs a closure"):
        wrap(torch.optim.LBFGS(_params()))


def test_childtuning_masks_a_group_added_to_its_base_directly():
    """The adapter's mode reaches a group added to a torch base after wrapping (its own keys filled
    in at the next step): an F mask at reserve_p=0.5 leaves some entries of a ones-gradient at 0."""
    a, b = torch.nn.Parameter(torch.zeros(64)), torch.nn.Parameter(torch.zeros(64))
    opt = optimfx.ChildTuning(torch.optim.SGD([a], lr=1.0), "F", 0.5)
    opt.base.add_param_group({"params": [b]})
    a.grad, b.grad = torch.ones(64), torch.ones(64)
    opt.step()
    assert opt.param_groups[1]["child_tuning_mode"] == "F"
    assert int((b == 0).sum()) > 0 and int((b == -2).sum()) > 0
