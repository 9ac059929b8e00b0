"""``state_dict`` / ``load_state_dict``: resume equality, serialisation, state dtypes, old formats, hooks."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from _harness import assert_runs_equal, clone_params, make_grads, make_params, require, run, state_entries, steps_taken
from optim_db import rows, rows_x_backends
import optimfx
from optimfx import _dispatch

SHAPES = [(6, 4), ()]  # few shapes: each shape is a new graph per step for the compiled backend


def _resume(row, backend, device, steps=(2, 2), edit=None):
    """Run ``steps[0]`` steps, save, load into a fresh optimizer, run both ``steps[1]`` more.

    ``edit(state_dict)`` may rewrite the saved state dict (on a deep copy) before it is loaded.
    Returns the uninterrupted and the resumed (optimizer, params).
    """
    params = make_params(SHAPES, device)
    grads = make_grads(params, sum(steps))
    opt = row.make(params, backend)
    run(opt, params, grads[:steps[0]])
    resumed = clone_params(params)
    opt_resumed = row.make(resumed, backend)
    saved = opt.state_dict()
    if edit is not None:
        saved = edit(copy.deepcopy(saved))
    opt_resumed.load_state_dict(saved)
    run(opt, params, grads[steps[0]:])
    run(opt_resumed, resumed, grads[steps[0]:])
    return (opt, params), (opt_resumed, resumed)


@pytest.mark.parametrize("row, backend", rows_x_backends(("reference", "triton", "compiled")))
def test_resume_continues_in_lockstep(row, backend, device):
    require(backend, device)
    (opt, params), (opt2, params2) = _resume(row, backend, device)
    assert_runs_equal(opt, params, opt2, params2)
    # loaded state must be the new optimizer's own, not tensors shared with the saved optimizer
    mine = {v.data_ptr() for p in params for v in opt.state[p].values() if v.numel()}
    assert not mine & {v.data_ptr() for p in params2 for v in opt2.state[p].values() if v.numel()}


def _assert_state_dicts_equal(a, b):
    """``b`` holds everything ``a`` does (torch's ``__setstate__`` may add group keys on load)."""
    assert [{k: g[k] for k in ga} for ga, g in zip(a["param_groups"], b["param_groups"])] == a["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, state in a["state"].items():
        assert state.keys() == b["state"][i].keys()
        for key, value in state.items():
            other = b["state"][i][key]
            assert value.dtype == other.dtype and value.device == other.device, (i, key)
            assert torch.equal(value, other), (i, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_torch_save_then_load_weights_only_keeps_state_and_dtypes(row, backend, dtype, device):
    """bf16 parameters keep fp32 state through save, ``torch.load(weights_only=True)`` and
    ``load_state_dict`` (which, in torch.optim, would cast state to the parameter dtype)."""
    require(backend, device)
    params = make_params(SHAPES, device, dtype)
    grads = make_grads(params, 4)
    opt = row.make(params, backend)
    run(opt, params, grads[:2])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_state_dicts_equal(opt.state_dict(), loaded)
    resumed = clone_params(params)
    opt_resumed = row.make(resumed, backend)
    opt_resumed.load_state_dict(loaded)
    _assert_state_dicts_equal(opt.state_dict(), opt_resumed.state_dict())
    run(opt, params, grads[2:])
    run(opt_resumed, resumed, grads[2:])
    assert_runs_equal(opt, params, opt_resumed, resumed)


@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_fp32_checkpoint_loads_into_a_bf16_model(row, backend, device):
    require(backend, device)
    params = make_params(SHAPES, "cpu")
    # the checkpoint is written on the CPU: by the same backend where it runs there (the Triton
    # interpreter), else by the reference (the state layout is the same for every backend)
    opt = row.make(params, backend if backend != "triton" or _dispatch.interpreting() else "reference")
    run(opt, params, make_grads(params, 2))
    saved = opt.state_dict()
    low = [p.detach().to(device=device, dtype=torch.bfloat16).requires_grad_() for p in params]
    opt_low = row.make(low, backend)
    opt_low.load_state_dict(saved)
    for entry, restored_entry in zip(state_entries(opt, params), state_entries(opt_low, low)):
        for key, value in entry.items():
            restored = restored_entry[key]
            assert restored.dtype == value.dtype, key
            assert torch.equal(restored.cpu(), value), key
    run(opt_low, low, make_grads(low, 2, seed=5))
    for q in low:
        assert q.dtype == torch.bfloat16 and q.isfinite().all()
        floating = [v for k, v in opt_low.state[q].items() if k != "step" and v.is_floating_point()]
        assert all(v.dtype == torch.float32 for v in floating)


def _number_steps(key, kind):
    def edit(sd):
        for state in sd["state"].values():
            state[key] = kind(state[key].item())
        return sd
    return edit


@pytest.mark.parametrize("kind", [int, float])
@pytest.mark.parametrize("row, backend", rows_x_backends())
def test_state_dict_with_python_number_step_loads_and_steps(row, backend, kind, device):
    require(backend, device)
    (opt, params), (opt2, params2) = _resume(row, backend, device, edit=_number_steps(row.step_key, kind))
    assert_runs_equal(opt, params, opt2, params2)
    assert steps_taken(row, opt2, params2) == [4] * len(params2)


def _drop_group_keys(sd):
    for group in sd["param_groups"]:
        for key in [k for k in group if k not in ("params", "lr")]:
            del group[key]
    return sd


@pytest.mark.parametrize("row", rows())
def test_state_dict_from_before_an_option_existed_loads(row):
    """Groups saved with only ``lr`` get every other hyperparameter from the current defaults."""
    (opt, params), (opt2, params2) = _resume(row, "reference", "cpu", edit=_drop_group_keys)
    assert set(opt2.defaults) <= set(opt2.param_groups[0])
    assert_runs_equal(opt, params, opt2, params2)


@pytest.mark.parametrize("row", rows())
def test_load_rejects_a_different_group_layout(row):
    a, b = make_params(SHAPES), make_params(SHAPES)
    saved = row.make([{"params": a[:1]}, {"params": a[1:]}]).state_dict()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        row.make(b).load_state_dict(saved)


@pytest.mark.parametrize("row", rows())
def test_state_dict_hooks_and_a_remapping_load_pre_hook(row):
    """A load pre-hook may rewrite the state dict (here: the new optimizer lists the parameters in
    the other order); what gets loaded is the hook's result, not the dict passed in."""
    params = make_params(SHAPES)
    opt = row.make(params)
    run(opt, params, make_grads(params, 1))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save post") or {**sd, "extra": 1})

    def load_pre(o, sd):
        calls.append("load pre")
        state = {len(params) - 1 - i: s for i, s in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]}

    saved = opt.state_dict()
    assert saved["extra"] == 1
    reordered = clone_params(params)[::-1]
    target = row.make(reordered)
    target.register_load_state_dict_pre_hook(load_pre)
    target.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    target.load_state_dict(saved)
    assert calls == ["save pre", "save post", "load pre", "load post"]
    assert_runs_equal(opt, params, target, reordered[::-1])


#: (the optimizer that writes the checkpoint, the one that loads it, what the refusal names)
_FOREIGN_CHECKPOINTS = {
    "AdaX-into-AdaFactor": (optimfx.AdaX, optimfx.AdaFactor, "'decoupled', written by optimfx.AdaX/AdaXW"),
    "AdaFactor-into-AdaXW": (optimfx.AdaFactor, optimfx.AdaXW, "'beta2_cap', 'clip_threshold'"),
    "AdamW-into-AdaXW": (optimfx.AdamW, optimfx.AdaXW, "'correct_bias', 'decay_order', 'eps_placement'"),
    # its betas are valid AdaX betas: only the keys show it is Adam's (it loaded silently before)
    "torch-Adam-into-AdaX": (torch.optim.Adam, optimfx.AdaX, "written by torch.optim.Adam/AdamW"),
    "torch-SGD-into-AdamW": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), optimfx.AdamW,
                             "'dampening', 'nesterov', written by torch.optim.SGD"),
    "torch-Adam-L2-into-AdamW": (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), optimfx.AdamW,
                                 "torch.optim.Adam's with L2 weight decay"),
    "torch-Adafactor-into-AdaX": (torch.optim.Adafactor, optimfx.AdaX, "written by torch.optim.Adafactor"),
    # nothing in its groups betrays it: its state does (it failed with a KeyError at the first step)
    "torch-Adamax-into-AdaX": (torch.optim.Adamax, optimfx.AdaX, "state has 'exp_inf', written by torch.optim.Adamax"),
}


@pytest.mark.parametrize("source, target, named", _FOREIGN_CHECKPOINTS.values(), ids=_FOREIGN_CHECKPOINTS.keys())
def test_another_optimizers_checkpoint_is_refused_and_changes_nothing(source, target, named):
    """A checkpoint of another algorithm is a ``ValueError`` at load time that names what betrays it
    (keys only another family writes, or a variant optimfx lacks), and the optimizer keeps its own
    state and groups."""
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    params[0].grad = torch.randn(3, 2)
    other, opt = source(params), target(params)
    other.step()
    opt.step()
    kept = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"^{type(opt).__name__}\.load_state_dict: .*checkpoint") as err:
        opt.load_state_dict(other.state_dict())
    assert named in str(err.value)
    now = opt.state_dict()
    assert now["param_groups"] == kept["param_groups"]
    for key, value in kept["state"][0].items():
        assert torch.equal(now["state"][0][key], value)
    opt.step()


def test_a_checkpoint_whose_values_do_not_fit_is_refused_by_name():
    """Loaded groups pass the constructor's checks: a value this optimizer cannot take is a
    ``ValueError`` naming it at load time, not an error at the first step."""
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    params[0].grad = torch.randn(3, 2)
    opt = optimfx.AdaXW(params)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["eps_mode"] = "exact"
    with pytest.raises(ValueError, match=r"^AdaXW\.load_state_dict: param group 0 of the checkpoint: Invalid eps_mode"):
        optimfx.AdaXW(params).load_state_dict(saved)


@pytest.mark.parametrize("source", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_torch_adam_checkpoints_load_into_adamw_and_own_group_keys_are_kept(source):
    """The same moments: ``torch.optim.Adam`` (without L2 decay) and ``AdamW`` checkpoints continue in
    ``optimfx.AdamW``; keys a user or a wrapper (SAM's ``rho``) put in a group load as in torch, and
    the optimizer's own checkpoint loads again after a weight decay is set."""
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    params[0].grad = torch.randn(3, 2)
    theirs = source([{"params": params, "name": "encoder", "rho": 0.05, "momentum": 0.9}], lr=1e-2,
                    weight_decay=0.0)
    theirs.step()
    ours = optimfx.AdamW(params, lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    assert (ours.param_groups[0]["name"], ours.param_groups[0]["rho"]) == ("encoder", 0.05)
    assert int(ours.state[params[0]]["step"]) == 1
    torch.testing.assert_close(ours.state[params[0]]["exp_avg_sq"], theirs.state[params[0]]["exp_avg_sq"])
    ours.param_groups[0]["weight_decay"] = 0.01  # decoupled, as this optimizer decays
    ours.step()
    optimfx.AdamW(params, lr=1e-2).load_state_dict(ours.state_dict())


def test_a_refused_checkpoint_keeps_pending_d_masks():
    """D masks set before the first step wait outside the state; a refused load keeps them too."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = optimfx.ChildTuningAdamW([p], mode="ChildTuning-D")
    opt.set_gradient_mask({p: torch.zeros(3, 2, dtype=torch.bool)})
    other = optimfx.AdaFactor([torch.nn.Parameter(torch.randn(3, 2))])
    with pytest.raises(ValueError, match=r"^ChildTuningAdamW\.load_state_dict: param group 0"):
        opt.load_state_dict(other.state_dict())
    before = p.detach().clone()
    p.grad = torch.randn(3, 2)
    opt.step()  # the zero mask freezes p (no weight decay by default)
    assert torch.equal(p.detach(), before)

