"""Hyperparameters set per param group are checked as the constructor checks its own arguments
(``torch.optim`` checks only the constructor's): a clear ``ValueError`` naming the argument, whether
the group is given to the constructor or added later, and nothing is added on error."""

from __future__ import annotations

import pytest
import torch

import optimfx

CASES = [  # optimizer, key, bad value, message
    (optimfx.AdaX, "lr", -1.0, r"^Invalid lr: -1.0"),
    (optimfx.AdaX, "betas", (1.0, 1e-4), r"^Invalid betas\[0\]: 1.0 \(must be in \[0.0, 1.0\)\)"),
    (optimfx.AdaXW, "betas", (0.9, 0.0), r"^Invalid betas\[1\]: 0.0"),
    (optimfx.AdaXW, "eps", 0.0, r"^Invalid eps: 0.0"),
    (optimfx.AdaX, "eps_mode", "outside", r"^Invalid eps_mode: 'outside'"),
    (optimfx.AdamW, "betas", (0.9, 1.0), r"^Invalid betas\[1\]: 1.0"),
    (optimfx.AdamW, "eps", -1e-8, r"^Invalid eps: -1e-08"),
    (optimfx.AdamW, "weight_decay", -0.1, r"^Invalid weight_decay: -0.1"),
    (optimfx.AdamW, "decay_order", "later", r"^Invalid decay_order: 'later'"),
    (optimfx.ChildTuningAdamW, "betas", (float("nan"), 0.999), r"^Invalid betas\[0\]: nan"),
    (optimfx.AdaFactor, "clip_threshold", 0.0, r"^Invalid clip_threshold: 0.0"),
    (optimfx.AdaFactor, "decay_rate", 0.8, r"^Invalid decay_rate: 0.8"),
    (optimfx.AdaFactor, "beta1", 1.0, r"^Invalid beta1: 1.0"),
    (optimfx.AdaFactor, "lr", -1e-3, r"^Invalid lr: -0.001"),
    (optimfx.AdaFactor, "backend", "cuda", r"^Invalid backend: 'cuda'"),
    (optimfx.AdaFactor, "bf16_rounding", "up", r"^Invalid bf16_rounding: 'up'"),
    (optimfx.AdaFactor, "eps_mode", "bogus", r"^Invalid eps_mode: 'bogus'"),
    (optimfx.AdaX, "child_tuning_mode", "X", r"^Invalid child_tuning_mode: 'X'"),
    (optimfx.AdamW, "reserve_p", 0.0, r"^Invalid reserve_p: 0.0"),
    (optimfx.AdaFactor, "seed", 1.5, r"^Invalid seed: 1.5"),
    (optimfx.AdaXW, "rounding_seed", "x", r"^Invalid rounding_seed: 'x'"),
]


def _ids(case):
    return f"{case[0].__name__}-{case[1]}"


@pytest.mark.parametrize("cls, key, bad, message", CASES, ids=[_ids(c) for c in CASES])
def test_a_group_given_to_the_constructor_is_checked(cls, key, bad, message):
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=message):
        cls([{"params": [p], key: bad}])


@pytest.mark.parametrize("cls, key, bad, message", CASES, ids=[_ids(c) for c in CASES])
def test_a_group_added_later_is_checked_and_not_added(cls, key, bad, message):
    opt = cls([torch.nn.Parameter(torch.zeros(3, 2))])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], key: bad})
    assert len(opt.param_groups) == 1


def test_valid_group_values_are_kept_as_given():
    lr = torch.tensor(1e-3)  # a tensor lr stays the same tensor (schedulers write into it)
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = optimfx.AdamW([{"params": [p], "lr": lr, "betas": [0.8, 0.99]}], lr=torch.tensor(1e-3))
    opt.add_param_group({"params": [q], "weight_decay": 1})
    assert opt.param_groups[0]["lr"] is lr and opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert opt.param_groups[1]["weight_decay"] == 1.0
    assert optimfx.AdaFactor([{"params": [q], "beta1": None}]).param_groups[0]["beta1"] is None


def test_wrappers_check_through_their_base():
    base = optimfx.AdaX([torch.nn.Parameter(torch.zeros(2))])
    opt = optimfx.EGStepSize(base)
    with pytest.raises(ValueError, match=r"^Invalid betas\[0\]"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (2.0, 1e-4)})
    assert len(opt.param_groups) == 1


def test_adafactor_group_lr_none_means_the_relative_step_alone():
    """transformers' spelling: a group's ``lr=None`` is the relative step (multiplier 1.0), as the
    constructor reads it; without the relative step there is no step size, which is refused."""
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = optimfx.AdaFactor([{"params": [p], "lr": None}])
    opt.add_param_group({"params": [q], "lr": None})
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]
    fixed = optimfx.AdaFactor([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, relative_step=False)
    with pytest.raises(ValueError, match=r"^Invalid lr: None \(an lr is required when relative_step=False\)"):
        fixed.add_param_group({"params": [q], "lr": None})


@pytest.mark.parametrize("make", [optimfx.AdamW, optimfx.AdaX, optimfx.AdaFactor], ids=lambda c: c.__name__)
def test_a_parameter_listed_twice_is_refused(make):
    """torch warns (and steps it twice, counting two steps); one state with one step count cannot take
    two updates a step, so the group is refused and not added."""
    p, q = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="holds the same parameter twice"):
        make([p, q, p])
    opt = make([q])
    with pytest.raises(ValueError, match="holds the same parameter twice"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def test_adafactor_group_lr_with_the_relative_step_is_refused():
    """As the constructor's ``lr=1e-4`` with ``relative_step=True``: transformers' Adafactor ignores a
    group's lr there, so migrated per-group lrs would silently multiply the relative step by 1e-4.
    A group that turns the relative step off, or caps it (``lr_mode="rho_max"``), takes its lr."""
    p, q, r = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    with pytest.raises(ValueError, match=r"^Invalid lr: 0.0001 in a param group with relative_step=True"):
        optimfx.AdaFactor([{"params": [p], "lr": 1e-4}, {"params": [q]}])
    opt = optimfx.AdaFactor([p])
    with pytest.raises(ValueError, match=r"^Invalid lr: 0.0001 in a param group"):
        opt.add_param_group({"params": [q], "lr": 1e-4})
    opt.add_param_group({"params": [q], "lr": 1e-4, "relative_step": False})
    opt.add_param_group({"params": [r], "lr": 1e-2, "lr_mode": "rho_max"})
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1e-4, 1e-2]


@pytest.mark.parametrize("wrap, key, bad, message", [
    (lambda b: optimfx.EGStepSize(b), "gamma_scale", -0.1, r"^Invalid gamma_scale: -0.1"),
    (lambda b: optimfx.EGStepSize(b), "scope", "layer", r"^Invalid scope: 'layer'"),
    (lambda b: optimfx.EGStepSize(b), "exp_clip", -1.0, r"^Invalid exp_clip: -1.0"),
    (lambda b: optimfx.EGStepSize(b), "gain_min", 1e4, r"^Invalid gain_clamp: \(10000.0, 1000.0\)"),
    (lambda b: optimfx.ChildTuning(b, "F", 0.5), "reserve_p", 0.0, r"^Invalid reserve_p: 0.0"),
    (lambda b: optimfx.ChildTuning(b, "F", 0.5), "child_tuning_mode", "E", r"^Invalid mode: 'E'"),
], ids=["eg-gamma_scale", "eg-scope", "eg-exp_clip", "eg-gain-pair", "childtuning-reserve_p", "childtuning-mode"])
def test_wrapper_options_set_by_a_group_are_checked(wrap, key, bad, message):
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = wrap(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [q], key: bad})
    assert len(opt.param_groups) == 1
    # a base built with the bad value in a group: refused when the wrapper takes the groups over
    with pytest.raises(ValueError, match=message):
        wrap(torch.optim.SGD([{"params": [q], key: bad}], lr=0.1))


def test_group_spellings_and_scalars_users_pass_are_accepted():
    """The constructor's spellings of the mask mode (normalised as the constructor does), numpy
    scalars (layer-wise lr recipes built with numpy), and a group the adapter leaves unmasked."""
    np = pytest.importorskip("numpy")
    p, q = torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.ones(64))
    opt = optimfx.AdamW([{"params": [p], "lr": np.float32(0.1), "weight_decay": np.int64(0),
                          "child_tuning_mode": "ChildTuning-F", "reserve_p": 0.25}])
    assert opt.param_groups[0]["child_tuning_mode"] == "F"
    p.grad = torch.ones(64)
    opt.step()
    assert 0 < int((p.detach() != 1).sum()) < 40  # masked: about a quarter moved
    adapter = optimfx.ChildTuning(torch.optim.SGD([q], lr=0.1), "F", 0.5)
    adapter.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "child_tuning_mode": None})
    assert adapter.param_groups[1]["child_tuning_mode"] is None
