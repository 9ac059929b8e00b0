"""ChildTuning around foreign optimizers: p.grad untouched, identities with the fused AdamW path."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import optimfx
from _lockstep import assert_resumes_in_lockstep, assert_step_alike


def _problem(seed=0, steps=5):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(steps)]
    return init, grads


def _run(make, init, grads):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def test_reserve_p_one_is_the_base_bitwise():
    init, grads = _problem()
    plain, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), init, grads)
    wrapped, _ = _run(lambda ps: optimfx.ChildTuning(torch.optim.SGD(ps, lr=0.1, momentum=0.9), "F", 1.0),
                      init, grads)
    for a, b in zip(plain, wrapped):
        assert torch.equal(a, b)


def test_adapter_equals_fused_adamw_f_mode_on_the_reference_backend():
    """Same seed and stream ids → the same masks; AdamW(torch order) == torch.optim.AdamW maths."""
    init, grads = _problem()
    fused, _ = _run(lambda ps: optimfx.AdamW(ps, lr=1e-2, child_tuning_mode="F", reserve_p=0.4, seed=11,
                                             backend="reference"), init, grads)
    adapted, _ = _run(lambda ps: optimfx.ChildTuning(torch.optim.AdamW(ps, lr=1e-2, foreach=False), "F", 0.4,
                                                     seed=11), init, grads)
    for a, b in zip(fused, adapted):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # fp32, different op order


@pytest.mark.parametrize("mode", ["F", "D"])
def test_complex_param_equals_its_real_view(mode):
    """A complex parameter is masked as its (..., 2) real view (as the fused optimizers step it): F
    draws real and imaginary bits separately, a D mask covers both parts of its element."""
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
    grads = [torch.randn(4, 3, dtype=torch.complex64, generator=gen) for _ in range(3)]
    mask = torch.rand(4, 3, generator=gen) < 0.5
    runs = []
    for as_real in (False, True):
        p = torch.nn.Parameter(torch.view_as_real(init).clone() if as_real else init.clone())
        opt = optimfx.ChildTuning(torch.optim.SGD([p], lr=0.1), mode, 0.5, seed=2)
        if mode == "D":
            opt.set_gradient_mask({p: mask.unsqueeze(-1).expand(4, 3, 2) if as_real else mask})
        for g in grads:
            p.grad = torch.view_as_real(g).clone() if as_real else g.clone()
            opt.step()
        runs.append(torch.view_as_real(p.detach()) if p.is_complex() else p.detach())
    # torch's complex SGD arithmetic rounds an ulp or so apart from the real view's; a differing mask
    # bit would move an element by lr·g/p ≈ 0.2
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(runs[0], torch.view_as_real(init))


def test_user_gradients_are_restored_and_untouched():
    p = torch.nn.Parameter(torch.randn(50))
    g = torch.randn(50)
    p.grad = g
    opt = optimfx.ChildTuning(torch.optim.SGD([p], lr=0.1), "F", 0.3)
    opt.step()
    assert p.grad is g and torch.equal(g, g.clone())


def test_d_mode_masks_and_checkpoint():
    init, grads = _problem()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = optimfx.ChildTuning(torch.optim.SGD(params, lr=0.1), "ChildTuning-D")
    opt.set_gradient_mask({params[0]: torch.zeros(6, 5)})
    for gs in grads[:2]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    assert torch.equal(params[0].detach(), init[0])
    assert not torch.equal(params[1].detach(), init[1])
    restored = optimfx.ChildTuning(torch.optim.SGD(params, lr=0.1), "D")
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.state[params[0]]["child_mask"].dtype == torch.uint8


def _adamw_f(ps):
    return optimfx.ChildTuning(torch.optim.AdamW(ps, lr=1e-2), "F", 0.5, seed=4)


@pytest.mark.parametrize("layout", ["per-parameter", "base-key", "without-mask-stream"])
def test_checkpoint_resumes_in_lockstep(layout):
    """The state dict holds one entry per parameter with the adapter's state and the base's as
    ``base/<key>`` (what distributed checkpoints keep); the earlier layout with the base's state dict
    under ``"base"`` still loads, and so does an earlier checkpoint without the F-mode stream numbers
    (they default to the position). Either way a resumed run continues bit for bit."""
    init, grads = _problem(steps=6)
    ref_params, ref_opt = _run(_adamw_f, init, grads[:3])
    saved = copy.deepcopy(ref_opt.state_dict())
    assert set(saved) == {"state", "param_groups"}
    base = ref_opt.base.state_dict()["state"]
    for i, entry in saved["state"].items():
        assert set(entry) == {"step", "mask_stream"} | {f"base/{k}" for k in base[i]}
        assert int(entry["mask_stream"]) == i
    if layout == "without-mask-stream":
        for entry in saved["state"].values():
            del entry["mask_stream"]
    if layout == "base-key":
        saved = {"state": {i: {k: v for k, v in e.items() if not k.startswith("base/")}
                           for i, e in saved["state"].items()},
                 "param_groups": saved["param_groups"], "base": copy.deepcopy(ref_opt.base.state_dict())}
    assert_resumes_in_lockstep(_adamw_f, ref_params, ref_opt, saved, grads[3:])


def test_errors():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="mode"):
        optimfx.ChildTuning(torch.optim.SGD([p], lr=0.1), "G")
    with pytest.raises(ValueError, match="reserve_p"):
        optimfx.ChildTuning(torch.optim.SGD([p], lr=0.1), "F", reserve_p=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_numbers_survive_a_checkpoint_of_low_precision_parameters(dtype):
    """Loading casts state to the parameter dtype, where bf16 (fp16) holds whole numbers exactly only
    up to 256 (2048): the stream numbers come back from the saved integers, all 3000 of them."""
    params = [torch.nn.Parameter(torch.randn(2, dtype=dtype)) for _ in range(3000)]
    opt = optimfx.ChildTuning(torch.optim.SGD(params, lr=0.1), "F", 0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = optimfx.ChildTuning(torch.optim.SGD(copies, lr=0.1), "F", 0.5)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    streams = [loaded.state[p]["mask_stream"] for p in copies]
    assert [int(s) for s in streams] == list(range(3000))
    assert all(s.dtype == torch.int64 and s.device.type == "cpu" for s in streams)


def test_a_loaded_step_counter_is_not_shared_with_the_source():
    """torch hands ``step`` over without a copy; stepping the loaded optimizer must not advance the
    source's counter (an increment in place would)."""
    init, grads = _problem(steps=2)
    params, source = _run(_adamw_f, init, grads[:1])
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = _adamw_f(copies)
    loaded.load_state_dict(source.state_dict())
    for p, g in zip(copies, grads[1]):
        p.grad = g.clone()
    loaded.step()
    assert [int(source.state[p]["step"]) for p in params] == [1, 1]
    assert [int(loaded.state[p]["step"]) for p in copies] == [2, 2]


FUSED_BASES = {
    "adamw": lambda ps, **kw: optimfx.AdamW(ps, lr=1e-2, **kw),
    "adax": lambda ps, **kw: optimfx.AdaX(ps, lr=1e-2, **kw),
    "adaxw": lambda ps, **kw: optimfx.AdaXW(ps, lr=1e-2, **kw),
    "adafactor": lambda ps, **kw: optimfx.AdaFactor(ps, **kw),
}


@pytest.mark.parametrize("mode", ["F", "D"])
@pytest.mark.parametrize("base", list(FUSED_BASES))
def test_around_an_optimfx_optimizer_the_masks_are_its_own(base, mode):
    """The adapter around an optimizer that masks gradients itself sets its mask options (a group's
    keys of the same name held the base's default, no mask, which the adapter once left in place):
    the run equals the optimizer given the same options."""
    make = FUSED_BASES[base]
    init, grads = _problem()
    masks = {1: torch.tensor([True, False, True, False, False])}

    def with_masks(opt, params):
        if mode == "D":
            opt.set_gradient_mask({params[i]: m for i, m in masks.items()})
        return opt

    direct, _ = _run(lambda ps: with_masks(make(ps, child_tuning_mode=mode, reserve_p=0.4, seed=9), ps), init, grads)
    adapted, opt = _run(lambda ps: with_masks(optimfx.ChildTuning(make(ps), mode, 0.4, seed=9), ps), init, grads)
    for a, b in zip(direct, adapted):
        assert torch.equal(a, b)
    assert all(g["child_tuning_mode"] == mode for g in opt.base.param_groups)


def test_a_zero_d_mask_freezes_a_tensor_through_the_adapter():
    p = torch.nn.Parameter(torch.ones(4))
    opt = optimfx.ChildTuning(optimfx.AdaX([p], lr=0.1, weight_decay=0.0), "D")
    opt.set_gradient_mask({p: torch.zeros(4, dtype=torch.bool)})
    p.grad = torch.ones(4)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))


def test_a_group_added_to_a_delegating_adapter_is_masked_too():
    p, q = torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.ones(64))
    opt = optimfx.ChildTuning(optimfx.AdamW([p], lr=0.1, weight_decay=0.0), "F", 0.25, seed=1)
    opt.add_param_group({"params": [q]})
    assert opt.param_groups[1]["child_tuning_mode"] == "F" and opt.param_groups[1]["reserve_p"] == 0.25
    q.grad = torch.ones(64)
    opt.step()
    moved = int((q.detach() != 1).sum())
    assert 0 < moved < 40  # about a quarter of 64 kept (binomial: P(moved ≥ 40) < 1e-9)


def test_masking_twice_is_refused():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="already masks its gradients"):
        optimfx.ChildTuning(optimfx.AdamW([p], child_tuning_mode="F", reserve_p=0.5), "F", 0.5)


def test_around_a_wrapper_of_an_optimfx_optimizer_it_says_where_to_put_the_masks():
    """EGStepSize(AdaX) shares AdaX's groups, whose mask options are AdaX's: the adapter can neither
    leave them (no mask: what it once did silently) nor set them (AdaX would mask a second time)."""
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"wrap that optimizer instead"):
        optimfx.ChildTuning(optimfx.EGStepSize(optimfx.AdaX([p])), "D")
    inner = optimfx.EGStepSize(optimfx.ChildTuning(optimfx.AdaX([p], lr=0.1, weight_decay=0.0), "D"))
    inner.base.set_gradient_mask({p: torch.zeros(4, dtype=torch.bool)})
    p.grad = torch.ones(4)
    inner.step()
    assert torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("copy_fn", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_a_copy_steps_like_the_original(copy_fn):
    init, grads = _problem(steps=4)
    params, opt = _run(_adamw_f, init, grads[:2])
    twin = copy_fn(opt)
    assert_step_alike(params, opt, twin.param_groups[0]["params"], twin, grads[2:])


def _frozen_by_a_zero_mask(opt, p) -> bool:
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()
    return torch.equal(p.detach(), before)


def test_a_d_mask_set_before_the_first_step_is_checkpointed():
    p = torch.nn.Parameter(torch.ones(8))
    opt = optimfx.ChildTuning(optimfx.AdaX([p], lr=0.1, weight_decay=0.0), "D")
    opt.set_gradient_mask({p: torch.zeros(8, dtype=torch.bool)})
    saved = copy.deepcopy(opt.state_dict())
    assert "base/child_mask" in saved["state"][0] and "base/step" not in saved["state"][0]
    q = torch.nn.Parameter(torch.ones(8))
    loaded = optimfx.ChildTuning(optimfx.AdaX([q], lr=0.1, weight_decay=0.0), "D")
    loaded.load_state_dict(saved)
    assert _frozen_by_a_zero_mask(loaded, q)
    direct = optimfx.AdaX([p], lr=0.1, weight_decay=0.0, child_tuning_mode="D")  # the optimizer itself too
    direct.set_gradient_mask({p: torch.zeros(8, dtype=torch.bool)})
    again = optimfx.AdaX([q], lr=0.1, weight_decay=0.0, child_tuning_mode="D")
    again.load_state_dict(direct.state_dict())
    assert _frozen_by_a_zero_mask(again, q)


def test_a_checkpoint_of_the_earlier_adapter_layout_masks_again():
    """Written before the adapter handed an optimfx optimizer its masks: the groups said "no mask"
    (the base's default) and the D masks sat in the adapter's own state."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = optimfx.ChildTuning(optimfx.AdaX([p], lr=0.1, weight_decay=0.0), "D")
    opt.set_gradient_mask({p: torch.zeros(8, dtype=torch.bool)})
    p.grad = torch.ones(8)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        entry["child_mask"] = entry.pop("base/child_mask")
    for group in saved["param_groups"]:
        group["child_tuning_mode"] = None
    q = torch.nn.Parameter(p.detach().clone())
    loaded = optimfx.ChildTuning(optimfx.AdaX([q], lr=0.1, weight_decay=0.0), "D")
    with pytest.warns(UserWarning, match="applies from now on"):
        loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["child_tuning_mode"] == "D"
    assert _frozen_by_a_zero_mask(loaded, q)


def _dcp_round_trip(model, opt, make, tmp_path, steps=3):
    """Train ``steps``, save model and optimizer with ``torch.distributed.checkpoint`` (one process),
    train ``steps`` more; then build a fresh pair with ``make``, load, train ``steps``: both runs'
    weights (the second equal to the first bit for bit when the resume is exact)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 6, generator=gen) for _ in range(2 * steps)]

    def train(m, o, xs):
        for x in xs:
            o.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            o.step()
        o.zero_grad(set_to_none=True)  # as a training loop leaves it before a checkpoint

    train(model, opt, batches[:steps])
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path))
    train(model, opt, batches[steps:])
    resumed, resumed_opt = make()
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=str(tmp_path))
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    train(resumed, resumed_opt, batches[steps:])
    return model, resumed


@pytest.mark.parametrize("base", ["adax", "adamw", "adafactor"])
def test_around_an_optimfx_optimizer_dcp_reads_and_resumes_exactly(base, tmp_path):
    """The adapter's state is its base's; DCP takes an optimizer with empty state for a fresh one and
    steps it with zero gradients to create state. Reading the state for a checkpoint must change
    nothing, and a DCP resume must continue bit for bit."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    bases = {"adax": lambda ps: optimfx.AdaX(ps, lr=1e-2), "adamw": lambda ps: optimfx.AdamW(ps, lr=1e-2),
             "adafactor": lambda ps: optimfx.AdaFactor(ps)}

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        return model, optimfx.ChildTuning(bases[base](model.parameters()), "F", 0.5, seed=1)

    model, opt = make()
    for _ in range(2):
        model(torch.randn(8, 6)).square().mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    before = copy.deepcopy(opt.base.state_dict())
    get_optimizer_state_dict(model, opt)
    after = opt.base.state_dict()
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), name

    first, resumed = _dcp_round_trip(*make(), make, tmp_path)
    for a, b in zip(first.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_d_masks_set_before_a_dcp_load_restore_the_base_state(tmp_path):
    """Masks set before loading (as the distributed recipe says) wait apart from the state, so the
    adapter looks fresh to DCP and its template holds the base's state too."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        opt = optimfx.ChildTuning(torch.optim.Adam(model.parameters(), lr=1e-2), "D")
        gen = torch.Generator().manual_seed(5)
        opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < 0.6 for p in model.parameters()})
        return model, opt

    first, resumed = _dcp_round_trip(*make(), make, tmp_path)
    for a, b in zip(first.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [
    lambda ps: optimfx.ChildTuning(torch.optim.SGD(ps, lr=0.1), "D"),
    lambda ps: optimfx.ChildTuningAdamW(ps, lr=0.1, mode="ChildTuning-D"),
], ids=["adapter", "childtuning-adamw"])
@pytest.mark.parametrize("copy_fn", [copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))], ids=["deepcopy", "pickle"])
def test_a_d_mask_set_before_the_first_step_survives_a_copy(make, copy_fn):
    """Masks set before a tensor's first step wait apart from the state; a copy of the model and its
    optimizer keeps them, on the copy's own parameters."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = make(model.parameters())
    opt.set_gradient_mask({model.weight: torch.zeros(3, 4)})
    model_copy, opt_copy = copy_fn((model, opt))
    before = model_copy.weight.detach().clone()
    model_copy(torch.randn(8, 4)).square().mean().backward()
    opt_copy.step()
    assert torch.equal(model_copy.weight, before)
    assert not torch.equal(model_copy.bias, model.bias)
