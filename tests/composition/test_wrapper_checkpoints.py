"""Loading a wrapper's checkpoint (``EGStepSize``, ``Funnel``, ``ChildTuning``): a refused load leaves
wrapper and base as they were, and a checkpoint that lost the base's state is refused instead of
silently dropping it (``torch.distributed.checkpoint``'s flattened optimizer state dicts do)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import optimfx
from optimfx.optim._wrapped_state import BASE_PREFIX


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=gen)).square().mean().backward()
        opt.step()


def _snapshot(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


def _assert_same(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, entry in a["state"].items():
        assert entry.keys() == b["state"][key].keys()
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["state"][key][name]), name


def test_a_refused_funnel_load_leaves_wrapper_and_base_unchanged():
    """EG's own check of the loaded groups runs after the base has loaded: a refusal there put the
    base's groups back too (it used to leave the base loaded and the optimizer unable to step)."""
    source_model = _model()
    source = optimfx.EGStepSize(torch.optim.SGD(source_model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    _train(source_model, source, 2)
    model = _model()
    funnel = optimfx.Funnel(model.parameters(), lr=0.05)
    _train(model, funnel, 3)
    before = _snapshot(funnel)
    with pytest.raises(ValueError, match="momentum"):
        funnel.load_state_dict(source.state_dict())
    _assert_same(_snapshot(funnel), before)
    assert funnel.base.param_groups is funnel.param_groups
    _train(model, funnel, 1)


@pytest.mark.parametrize("make", [
    lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps)),
    lambda ps: optimfx.ChildTuning(torch.optim.SGD(ps, lr=0.1, momentum=0.9), "ChildTuning-F", 0.5),
], ids=["EG(AdamW)", "ChildTuning(SGD)"])
def test_a_checkpoint_without_the_bases_state_is_refused(make):
    """The base has state, the checkpoint has the wrapper's only (as a flattened DCP state dict comes
    back): refused, nothing changed, instead of a base that silently restarts from zero."""
    model = _model()
    opt = make(model.parameters())
    _train(model, opt, 2)
    saved = opt.state_dict()
    stripped = {**saved, "state": {k: {n: v for n, v in e.items() if not n.startswith(BASE_PREFIX)}
                                   for k, e in saved["state"].items()}}
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):
        opt.load_state_dict(stripped)
    _assert_same(_snapshot(opt), before)
    opt.load_state_dict(saved)  # the whole checkpoint loads
    _train(model, opt, 1)


def test_a_base_without_state_loads_a_checkpoint_without_base_entries():
    """Around a plain SGD base EG forms the step itself: the base never has state, and its
    checkpoint has no base entries to lose."""
    model = _model()
    opt = optimfx.EGStepSize(torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, opt, 2)
    saved = opt.state_dict()
    assert not any(k.startswith(BASE_PREFIX) for e in saved["state"].values() for k in e)
    fresh = optimfx.EGStepSize(torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, fresh, 1)
    fresh.load_state_dict(saved)
    _assert_same(_snapshot(fresh), _snapshot(opt))


def test_dcp_flattened_state_dict_is_refused_not_dropped():
    """The real ``torch.distributed.checkpoint`` round trip (gloo, one process, in a subprocess):
    the default options keep the base's state; ``flatten_optimizer_state_dict=True`` is refused."""
    script = textwrap.dedent("""
        import os, warnings, torch, torch.distributed as dist, optimfx
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        warnings.simplefilter("ignore")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29561"))
        dist.init_process_group("gloo", rank=0, world_size=1)
        def make():
            torch.manual_seed(0)
            model = torch.nn.Linear(6, 2)
            return model, optimfx.EGStepSize(optimfx.AdamW(model.parameters()))
        def train(model, opt):
            for _ in range(2):
                model(torch.randn(4, 6)).square().mean().backward(); opt.step(); opt.zero_grad()
        for flat in (False, True):
            options = StateDictOptions(flatten_optimizer_state_dict=flat)
            model, opt = make(); train(model, opt)
            saved = get_optimizer_state_dict(model, opt, options=options)
            model2, opt2 = make()
            try:
                set_optimizer_state_dict(model2, opt2, saved, options=options)
                kept = opt2.base.state_dict()["state"].keys() == opt.base.state_dict()["state"].keys()
                print("flat" if flat else "default", "loaded", "base kept" if kept else "base LOST")
            except ValueError as err:
                print("flat" if flat else "default", "refused", "flatten_optimizer_state_dict" in str(err))
        dist.destroy_process_group()
    """)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PORT": str(port)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["default loaded base kept", "flat refused True"], run.stdout
