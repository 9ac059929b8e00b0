"""Step counters of a group: views of one int64 buffer, correct under changing participation, and
saved one by one in checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

import optimfx
from optimfx._counters import StepCounters, group_counters, standalone_steps


def _params(n: int = 3) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n)]


def _grad(params, which):
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i in which else None


def _steps(opt, params, participation):
    """One step per entry of ``participation``: the indices of the parameters that get a gradient."""
    for which in participation:
        _grad(params, which)
        opt.step()


def test_counters_are_views_of_one_buffer_and_read_as_ints():
    params = _params()
    opt = optimfx.AdaX(params, lr=1e-3)
    _steps(opt, params, [{0, 1, 2}] * 3)
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dtype == torch.int64 and s.device.type == "cpu" and s.dim() == 0 for s in steps)
    assert [int(s) for s in steps] == [3, 3, 3]
    base = steps[0]._base
    assert base is not None and all(s._base is base for s in steps)


def test_changing_participation_keeps_every_count():
    params = _params()
    opt = optimfx.AdamW(params, lr=1e-3)
    _steps(opt, params, [{0, 1, 2}, {1}, {1, 2}, {0, 2}, {0, 1, 2}])
    assert [int(opt.state[p]["step"]) for p in params] == [3, 4, 4]


def test_state_dict_saves_standalone_counters_and_resume_continues():
    params = _params()
    opt = optimfx.AdaXW(params, lr=1e-3)
    _steps(opt, params, [{0, 1, 2}] * 2)
    saved = opt.state_dict()
    assert all(entry["step"]._base is None for entry in saved["state"].values())
    # the live state still holds the group's views
    assert opt.state[params[0]]["step"]._base is not None
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = optimfx.AdaXW(resumed, lr=1e-3)
    opt2.load_state_dict(loaded)
    torch.manual_seed(1)
    _grad(params, {0, 1, 2})
    torch.manual_seed(1)
    _grad(resumed, {0, 1, 2})
    opt.step()
    opt2.step()
    assert [int(opt2.state[p]["step"]) for p in resumed] == [3, 3, 3]
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("value", [torch.tensor(7.0), torch.tensor(7, dtype=torch.int32), 7, 7.0])
def test_loaded_counters_become_int64_cpu_tensors(value):
    params = _params(1)
    opt = optimfx.AdaX(params, lr=1e-3)
    _grad(params, {0})
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = value
    opt.load_state_dict(sd)
    step = opt.state[params[0]]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.int64 and int(step) == 7
    _grad(params, {0})
    opt.step()
    assert int(opt.state[params[0]]["step"]) == 8


def test_group_counters_reuses_its_views_and_repacks_new_tensors():
    states = [{"step": torch.tensor(2, dtype=torch.int64)}, {"step": torch.tensor(5, dtype=torch.int64)}]
    cache: dict[int, StepCounters] = {}
    settled = []
    first = group_counters(states, cache, 0, settled.append)
    assert first.values() == [2, 5] and len(settled) == 1
    first.advance()
    again = group_counters(states, cache, 0, settled.append)
    assert again is first and len(settled) == 1 and again.values() == [3, 6]
    states[1]["step"] = torch.tensor(9, dtype=torch.int64)  # e.g. a loaded checkpoint
    repacked = group_counters(states, cache, 0, settled.append)
    assert repacked is not first and repacked.values() == [3, 9] and len(settled) == 2
    repacked.advance(-1)
    assert [int(s["step"]) for s in states] == [2, 8]


def test_standalone_steps_leaves_the_live_state_alone():
    buffer = torch.tensor([4, 5], dtype=torch.int64)
    live = {0: {"step": buffer[0], "m": torch.zeros(2)}, 1: {"step": buffer[1]}}
    sd = {"state": dict(live), "param_groups": []}
    out = standalone_steps(sd)
    assert out["state"][0]["step"]._base is None and int(out["state"][1]["step"]) == 5
    assert live[0]["step"]._base is buffer and out["state"][0]["m"] is live[0]["m"]
