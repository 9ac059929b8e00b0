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
