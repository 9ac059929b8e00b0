"""``transformers``' ``AdafactorSchedule`` on ``optimfx.AdaFactor``: code written for ``transformers``'
Adafactor with its logging scheduler runs unchanged, trains as ``transformers`` does, and logs the
same step size.

Training runs in float64 (tolerance of ``test_adafactor_parity.py``: the same equations in another
operation order). The logged step size differs from ``transformers``' by the parameter scale: here the
RMS of the parameter after the last update, there before it, which one update moves by at most
ρ_t·clip_threshold relative (≤ 1e-2 with the defaults): rtol=2e-2.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import optimfx
from optimfx.optim.adafactor import LOGGED_LR_KEY

transformers_opt = pytest.importorskip("transformers.optimization")

TOL = dict(rtol=1e-10, atol=1e-13)
CONFIGS = {
    "relative-step": dict(),
    "warmup-init": dict(warmup_init=True),  # the combination transformers' docstring recommends
    "beta1-wd": dict(beta1=0.9, weight_decay=0.01),
    # with an external lr the scheduler's writes are applied, in transformers as here
    "external-lr": dict(lr=1e-3, relative_step=False, scale_parameter=False),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen, dtype=torch.float64),
             torch.randn(16, 3, generator=gen, dtype=torch.float64)) for _ in range(n)]


def _train(model, opt, sched, batches) -> list[float]:
    logged = []
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        logged.append(float(sched.get_last_lr()[0]))
    return logged


def _expected_step_size(opt: optimfx.AdaFactor) -> float:
    """ρ_t·max(ε2, RMS(θ)) of the first parameter, written out independently of the optimizer."""
    group = opt.param_groups[0]
    p = group["params"][0]
    t = int(opt.state[p]["step"])
    rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1 / math.sqrt(t))
    return rho * max(group["eps"][1], float(p.detach().square().mean().sqrt()))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_trains_and_logs_as_transformers(config):
    kwargs = CONFIGS[config]
    # initial_lr equal to the lr the first step should use: the value the scheduler writes before it
    initial_lr = kwargs.get("lr", 1.0)
    ours_model, theirs_model = _model(), _model()
    ours = optimfx.AdaFactor(ours_model.parameters(), backend="reference", **kwargs)
    theirs = transformers_opt.Adafactor(theirs_model.parameters(), **kwargs)
    ours_sched = transformers_opt.AdafactorSchedule(ours, initial_lr=initial_lr)
    theirs_sched = transformers_opt.AdafactorSchedule(theirs, initial_lr=initial_lr)
    batches = _batches(12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # initial_lr=1.0: nothing to warn about
        ours_logged = _train(ours_model, ours, ours_sched, batches)
    theirs_logged = _train(theirs_model, theirs, theirs_sched, batches)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(torch.tensor(ours_logged), torch.tensor(theirs_logged), rtol=2e-2, atol=0)
    if kwargs.get("scale_parameter", True):
        assert ours_logged[-1] == pytest.approx(_expected_step_size(ours), rel=1e-12)
    assert ours.param_groups[0].get(LOGGED_LR_KEY, False) is kwargs.get("relative_step", True)


def test_default_initial_lr_scales_the_first_step_and_warns():
    """``AdafactorSchedule(opt)`` writes lr=0.0 before the first step: that step moves nothing (its
    multiplier is 0), the first read warns once, and later steps are transformers' steps."""
    model = _model()
    opt = optimfx.AdaFactor(model.parameters(), backend="reference")
    sched = transformers_opt.AdafactorSchedule(opt)
    before = copy.deepcopy(model.state_dict())
    x, y = _batches(1)[0]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"initial_lr=1\.0"):
        sched.step()
    moved = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, sched, _batches(2))
    assert any(not torch.equal(value, moved[key]) for key, value in model.state_dict().items())


def test_resume_keeps_the_group_marked():
    """The mark is part of the saved param group: a run resumed in the documented order (model,
    optimizer, scheduler, then the states) continues bit for bit."""
    batches = _batches(10)
    model = _model()
    opt = optimfx.AdaFactor(model.parameters(), backend="reference")
    sched = transformers_opt.AdafactorSchedule(opt, initial_lr=1.0)
    _train(model, opt, sched, batches[:5])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    _train(model, opt, sched, batches[5:])

    resumed = _model()
    resumed_opt = optimfx.AdaFactor(resumed.parameters(), backend="reference")
    resumed_sched = transformers_opt.AdafactorSchedule(resumed_opt)  # initial_lr=0.0 written here
    resumed.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    resumed_sched.load_state_dict(saved[2])
    assert resumed_opt.param_groups[0][LOGGED_LR_KEY] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(resumed, resumed_opt, resumed_sched, batches[5:])
    for a, b in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_transformers_checkpoint_written_under_the_schedule_continues():
    """``transformers``' checkpoint holds the logged step size as the group's lr (its relative step
    ignores it): loaded here it is the multiplier 1.0, and training continues as in ``transformers``."""
    batches = _batches(10)
    model = _model()
    theirs = transformers_opt.Adafactor(model.parameters())
    theirs_sched = transformers_opt.AdafactorSchedule(theirs)
    _train(model, theirs, theirs_sched, batches[:5])
    saved = copy.deepcopy((model.state_dict(), theirs.state_dict(), theirs_sched.state_dict()))
    assert 0.0 < saved[1]["param_groups"][0]["lr"] < 1e-2  # the logged α_t, not None
    _train(model, theirs, theirs_sched, batches[5:])

    resumed = _model()
    ours = optimfx.AdaFactor(resumed.parameters(), backend="reference")
    ours_sched = transformers_opt.AdafactorSchedule(ours)
    resumed.load_state_dict(saved[0])
    ours.load_state_dict(saved[1])
    ours_sched.load_state_dict(saved[2])
    assert ours.param_groups[0]["lr"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(resumed, ours, ours_sched, batches[5:])
    for a, b in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, **TOL)


def test_the_schedule_is_refused_on_a_capped_relative_step():
    """lr_mode='rho_max' reads lr as the cap of the relative step, which the scheduler would overwrite
    with the step size it logs (shrinking the cap every step)."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = optimfx.AdaFactor([p], lr=1e-2, lr_mode="rho_max", backend="reference")
    sched = transformers_opt.AdafactorSchedule(opt)
    p.square().sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="lr_mode='rho_max'"):
        sched.step()


def test_an_optimizer_rebuilt_from_its_own_groups():
    """The groups hold lr=1.0 (the relative step's multiplier) or the logged step size: both are
    accepted back, as a rebuild from ``param_groups`` (ZeRO's partition optimizers) passes them."""
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = optimfx.AdaFactor([{"params": [p]}, {"params": [q]}], backend="reference")
    sched = transformers_opt.AdafactorSchedule(opt, initial_lr=1.0)
    (p.square().sum() + q.square().sum()).backward()
    opt.step()
    sched.step()
    rebuilt = optimfx.AdaFactor([dict(g) for g in opt.param_groups])
    assert [g["lr"] for g in rebuilt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert optimfx.AdaFactor([dict(g) for g in optimfx.AdaFactor([p]).param_groups]).param_groups[0]["lr"] == 1.0
