"""``torch.optim``'s implementation flags: a ``torch.optim.AdamW(...)`` call runs unchanged on
``optimfx.AdamW`` (``foreach``/``fused`` ignored), the variants optimfx lacks are refused by name, and
a checkpoint of one (``amsgrad=True``) is refused instead of continuing as plain AdamW."""

from __future__ import annotations

import copy

import pytest
import torch

import optimfx


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3)


def _train(model, opt, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 5, generator=gen)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False),
                                   dict(capturable=False, differentiable=False)])
def test_adamw_takes_torch_adamw_calls_unchanged(flags):
    plain, flagged = _model(), _model()
    _train(plain, optimfx.AdamW(plain.parameters(), lr=1e-2))
    # torch.optim.AdamW's positional order: params, lr, betas, eps, weight_decay, amsgrad
    _train(flagged, optimfx.AdamW(flagged.parameters(), 1e-2, (0.9, 0.999), 1e-8, 1e-2, False, maximize=False,
                                  **flags))
    for a, b in zip(plain.parameters(), flagged.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["amsgrad", "capturable", "differentiable"])
def test_unsupported_variants_are_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"^Invalid {name}: True \("):
        optimfx.AdamW(_model().parameters(), **{name: True})


@pytest.mark.parametrize("name", ["foreach", "fused"])
def test_flags_must_be_none_or_bool(name):
    with pytest.raises(ValueError, match=rf"^Invalid {name}: 'yes'"):
        optimfx.AdamW(_model().parameters(), **{name: "yes"})


def test_adafactor_takes_torch_adafactors_foreach():
    model = _model()
    _train(model, optimfx.AdaFactor(model.parameters(), foreach=True))


def test_an_amsgrad_checkpoint_is_refused_and_changes_nothing():
    source = _model()
    theirs = torch.optim.AdamW(source.parameters(), lr=1e-2, amsgrad=True)
    _train(source, theirs)
    model = _model()
    ours = optimfx.AdamW(model.parameters(), lr=1e-2)
    _train(model, ours)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="amsgrad=True"):
        ours.load_state_dict(theirs.state_dict())
    after = ours.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, entry in before["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(after["state"][key][name], value, rtol=0, atol=0)


def test_a_plain_torch_adamw_checkpoint_still_loads():
    source = _model()
    theirs = torch.optim.AdamW(source.parameters(), lr=1e-2)
    _train(source, theirs)
    ours = optimfx.AdamW(_model().parameters(), lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    assert int(next(iter(ours.state.values()))["step"]) == 3
