"""AdaFactor's C kernel on CPU (``optimfx/reference/adafactor_cpu.py``) against the per-tensor reference.

Both runs take the same gradients; the reference run has the kernel and the stacking switched off.
The kernel sums rows, columns and RMS values in fp32 lanes added in double, the reference in ATen's
and BLAS's orders, so results agree to rounding, not bitwise: ``rtol=1e-5`` (~80 fp32 ulps) leaves
room for a few steps of reordered sums while a wrong statistic, scale or mask is off by percents;
elements near 0 are compared with an absolute tolerance scaled to the tensor's update (``_ATOL``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import optimfx
from optimfx._kernels import cpu_adafactor, cpu_build
from optimfx.reference import stacking

pytestmark = pytest.mark.skipif(not cpu_adafactor.available(),
                                reason=f"CPU kernels unavailable: {cpu_build.unavailable_reason('cpu_adafactor')}")

#: factored and unfactored tensors of every geometry the kernel cuts differently: one block and
#: many (a short last block), slices whose block is a divisor of the rows (300 → 150) or the whole
#: slice (257 rows, prime), rows longer than a piece (2500 > 2048 columns), a 1-D tensor of several
#: chunks, size-1 axes, a 0-d tensor, and a group large enough to be shared between threads
SHAPES = ([(16, 24)] * 3 + [()] + [(3, 5, 7)] * 2 + [(40,), (1, 9), (9, 1), (700, 100), (400, 400),
          (2, 300, 64), (2, 257, 64), (3, 2500), (40000,), (4, 3, 3, 3)])

CONFIGS = {
    "paper": dict(),
    "momentum-decay": dict(beta1=0.9, weight_decay=0.1),
    "fixed-lr": dict(lr=1e-3, relative_step=False, scale_parameter=False),
    "torch-decay": dict(lr=1e-2, relative_step=False, decay_mode="torch", weight_decay=0.05),
    "warmup-cap-clip": dict(warmup_init=True, beta2_cap=0.9, clip_threshold=0.5),
    "partly-unfactored": dict(min_dim_size_to_factor=8),
    "child-tuning-F": dict(child_tuning_mode="F", reserve_p=0.4, seed=3),
    "child-tuning-D": dict(child_tuning_mode="D", beta1=0.5),
    "maximize-momentum": dict(maximize=True, beta1=0.9, weight_decay=0.01),
}


def _params(shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(step: int, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    grads[0][3] = 0.0  # a zero row
    grads[1].zero_()  # a whole zero tensor
    return grads


def _d_masks(params) -> dict:
    gen = torch.Generator().manual_seed(7)
    return {p: torch.rand(p.shape, generator=gen) < 0.3 for p in params[::2]}


def _run(kwargs: dict, steps: int = 5, frozen_at: int | None = None, shapes=SHAPES):
    params = _params(shapes)
    opt = optimfx.AdaFactor(params, **kwargs)
    if kwargs.get("child_tuning_mode") == "D":
        opt.set_gradient_mask(_d_masks(params))
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, _grads(t, shapes))):
            # a tensor without a gradient at one step falls one step behind: one kernel call per step count
            p.grad = None if t == frozen_at and i % 2 else g
        opt.step()
    return params, opt


def _reference_run(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(cpu_adafactor, "available", lambda: False)
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        return _run(*args, **kwargs)


def _assert_same_run(fast, slow, shapes=SHAPES):
    (pf, opt_f), (ps, opt_s) = fast, slow
    for a, b, start in zip(pf, ps, _params(shapes)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=_ATOL * _scale(b - start))
    for a, b in zip(pf, ps):
        sa, sb = opt_f.state[a], opt_s.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor) and sa[key].is_floating_point():
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=_ATOL * _scale(sb[key]), msg=key)


#: an element that nearly cancels (a parameter crossing 0, a momentum entry) gets a large relative
#: error from an absolute one of a few roundings of the tensor's update: allowed up to 1e-5 of the
#: largest change of the tensor (observed: 3e-7 of it), while a wrong mask, scale or statistic is
#: off by a whole update
_ATOL = 1e-5


def _scale(x: torch.Tensor) -> float:
    return float(x.detach().abs().max()) if x.numel() else 0.0


@pytest.fixture
def kernel_numels(monkeypatch) -> list[int]:
    """The tensors' sizes of every kernel call (the tests would prove nothing if it never ran)."""
    seen: list[int] = []
    original = cpu_adafactor.step

    def spy(params, *args, **kwargs):
        seen.extend(p.numel() for p in params)
        return original(params, *args, **kwargs)

    monkeypatch.setattr(cpu_adafactor, "step", spy)
    return seen


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_kernel_step_equals_reference_step(config, monkeypatch, kernel_numels):
    fast = _run(config)
    assert sorted(kernel_numels) == sorted([p.numel() for p in fast[0]] * 5)
    _assert_same_run(fast, _reference_run(monkeypatch, config))


def test_tensors_at_different_step_counts(monkeypatch, kernel_numels):
    config = CONFIGS["momentum-decay"]
    _assert_same_run(_run(config, frozen_at=2), _reference_run(monkeypatch, config, frozen_at=2))
    assert len(kernel_numels) > 5 * len(SHAPES) - len(SHAPES)  # the frozen tensors' later steps too


def test_options_the_kernel_does_not_compute_take_the_reference(monkeypatch, kernel_numels):
    for config in (dict(lr=1e-2, eps=(None, 1e-3), lr_mode="rho_max", eps_mode="torch"), dict(eps=(0.0, 1e-3))):
        _assert_same_run(_run(config, steps=2), _reference_run(monkeypatch, config, steps=2))
    assert kernel_numels == []


def test_results_do_not_depend_on_threads(monkeypatch):
    """Blocks are fixed by the shapes: one thread, torch's threads, and the launcher's own thread
    pool (the path of a kernel built without OpenMP) give the same bits."""
    config = dict(beta1=0.9, child_tuning_mode="F", reserve_p=0.5)
    threads = torch.get_num_threads()
    runs = []
    try:
        built_with = cpu_adafactor._LIB.openmp
        for n, openmp in ((1, built_with), (max(threads, 2), built_with), (2, False)):
            torch.set_num_threads(n)
            with monkeypatch.context() as m:
                m.setattr(cpu_adafactor._LIB, "openmp", openmp)
                runs.append(_run(config, steps=3)[0])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_gradients_are_only_read():
    params = _params()
    opt = optimfx.AdaFactor(params, child_tuning_mode="F", reserve_p=0.5, maximize=True)
    grads = _grads(0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["kernel-tensor", "reference-tensor", "behind-one-step"])
@pytest.mark.parametrize("kernel", ["built", "unavailable"])
def test_a_nonfinite_gradient_skips_the_whole_group(bad, where, kernel, kernel_numels, monkeypatch):
    """The kernel's first pass checks its tensors; the others (here an fp16 parameter, which the
    kernel does not take) are checked before it runs; without the kernel, all of them are checked
    before the stacked reference step. Nothing of the group changes."""
    if kernel == "unavailable":
        monkeypatch.setattr(cpu_adafactor, "available", lambda: False)
    params = _params()
    params.append(torch.nn.Parameter(torch.randn(6, 5).half()))
    opt = optimfx.AdaFactor(params, beta1=0.9)
    grads = _grads(0) + [torch.randn(6, 5).half()]
    if where == "behind-one-step":  # two step counts: every gradient is checked before the kernel runs
        params[0].grad = grads[0]
        opt.step()
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    bad_grads = _grads(1) + [torch.randn(6, 5).half()]
    target = {"kernel-tensor": 9, "reference-tensor": -1, "behind-one-step": 9}[where]
    bad_grads[target].view(-1)[5] = bad
    for p, g in zip(params, bad_grads):
        p.grad = g
    calls = len(kernel_numels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("inf/NaN" in str(w.message) for w in caught)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for p in params:
        for k, v in opt.state[p].items():
            assert torch.equal(v, state_before[id(p)][k]), k
    if where == "kernel-tensor" and kernel == "built":
        assert len(kernel_numels) > calls  # the kernel's own pass found it
    assert (len(kernel_numels) > 0) == (kernel == "built")


def test_noncontiguous_gradient_takes_the_reference(monkeypatch, kernel_numels):
    shapes = [(30, 20), (30, 20), (20, 30)]
    params = _params(shapes)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = optimfx.AdaFactor(params), optimfx.AdaFactor(ref_params)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s[::-1], generator=gen).t() if i == 0 else torch.randn(s, generator=gen)
             for i, s in enumerate(shapes)]
    for p, q, g in zip(params, ref_params, grads):
        p.grad, q.grad = g, g.contiguous()
    opt.step()
    assert sorted(kernel_numels) == [600, 600]
    with monkeypatch.context() as m:
        m.setattr(cpu_adafactor, "available", lambda: False)
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        ref_opt.step()
    _assert_same_run((params, opt), (ref_params, ref_opt), shapes)


@pytest.mark.parametrize("slices,rows,cols", [(1, 10, 5), (1, 5000, 3), (1, 3, 50000), (4, 300, 64), (4, 257, 64),
                                              (7, 9, 9), (2, 1024, 1024)])
def test_blocks_are_whole_rows_of_one_slice(slices, rows, cols):
    block = cpu_adafactor.block_rows(slices, rows, cols)
    assert 1 <= block <= rows
    assert block >= min(rows, cpu_adafactor.MIN_BLOCK_ROWS)
    if slices > 1:
        assert rows % block == 0
    # the column sums of all blocks: at most 1/64 of the elements, or one slice's columns
    blocks = slices * -(-rows // block)
    assert blocks * cols <= max(slices * rows * cols // cpu_adafactor.MIN_BLOCK_ROWS, slices * cols)



def test_rows_whose_factor_is_capped(monkeypatch, kernel_numels):
    """A zero row next to large gradients: ``mean(R)/R_i`` passes the cap ``1/tiny``, and the kernel
    sums that tensor's ``ΣU²`` in a second pass, with the capped factor (its first pass's sum
    assumes no cap)."""
    shapes = [(16, 24), (2, 8, 12), (40,)]

    def run():
        params = _params(shapes)
        opt = optimfx.AdaFactor(params)
        for t in range(3):
            for p, g in zip(params, _grads(t, shapes)):
                p.grad = g * 1e7  # G² ≈ 1e10 per entry: mean(R) / ε1 > 1/tiny beside a zero row
            opt.step()
        return params, opt

    fast = run()
    assert kernel_numels
    with monkeypatch.context() as m:
        m.setattr(cpu_adafactor, "available", lambda: False)
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        slow = run()
    _assert_same_run(fast, slow, shapes)
    assert float(fast[1].state[fast[0][0]]["exp_avg_sq_row"][3]) < 1e-29  # the zero row


def test_f_mask_keys_formed_in_c_are_the_reference_keys():
    """The kernel forms each tensor's F-mask key from its stream (``child_tuning.mask_key``): for
    seeds and streams past 32 and 63 bits and any step."""
    from optimfx.reference import child_tuning as ct

    streams = torch.tensor([0, 1, 7, 2**31 + 5, 2**32 + 3, 2**40 + 1, 2**62 + 9], dtype=torch.int64)
    form = cpu_adafactor._LIB.function("optimfx_adafactor_mask_keys")
    for seed in (0, 3, 2**32 + 17, 2**63 + 11):
        for step in (1, 2, 1000, 2**32 + 1):
            keys = torch.zeros(len(streams), 2, dtype=torch.int64)
            form(streams.data_ptr(), len(streams), ct.seed_words(seed)[0], ct.step_word(seed, step),
                 keys.data_ptr() + 8, 2)
            assert [k % (1 << 64) for k in keys[:, 1].tolist()] == [ct.mask_key(seed, s, step) for s in streams.tolist()]
            assert not keys[:, 0].any()  # the stride is kept


def test_momentum_switched_on_after_the_state_was_made_is_not_taken():
    """``beta1`` set after the state was made (no ``exp_avg``): the kernel declines the tensor (it
    would have no momentum buffer to write) and the reference says what is missing."""
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = optimfx.AdaFactor([p])
    p.grad = torch.randn(64, 64)
    opt.step()
    assert cpu_adafactor.takes(p, p.grad, opt.state[p], momentum=False)
    assert not cpu_adafactor.takes(p, p.grad, opt.state[p], momentum=True)
    opt.param_groups[0]["beta1"] = 0.9
    with pytest.raises(KeyError, match="exp_avg"):
        opt.step()


def test_a_parameter_narrowed_in_place_gets_a_new_plan(monkeypatch):
    """Vocabulary pruning keeps the first rows of a parameter and of its state as views (same
    addresses, fewer elements): the kernel's cached layout must not be reused for them."""
    def run():
        p = torch.nn.Parameter(torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
        opt = optimfx.AdaFactor([p], skip_nonfinite=False)
        p.grad = torch.full((100_000,), 1e-2)
        opt.step()
        storage = p.data
        p.data = p.data[:1000]
        opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"][:1000]
        tail = storage[1000:].clone()
        p.grad = torch.full((1000,), -1e-2)
        opt.step()
        assert torch.equal(storage[1000:], tail)  # nothing written past the view
        return p.detach().clone()

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(cpu_adafactor, "available", lambda: False)
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        slow = run()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)


def test_a_mask_stream_loaded_as_int32(monkeypatch):
    """A converted checkpoint may hold the F-mask stream as int32: it is read as the same number."""
    def run():
        params = _params([(30, 20), (20,)])
        opt = optimfx.AdaFactor(params, child_tuning_mode="F", reserve_p=0.5, seed=5)
        for t in range(2):
            for p, g in zip(params, _grads(t, [(30, 20), (20,)])):
                p.grad = g
            opt.step()
            if t == 0:
                saved = opt.state_dict()
                for entry in saved["state"].values():
                    entry["mask_stream"] = (entry["mask_stream"] + 2**20).to(torch.int32)
                opt.load_state_dict(saved)
                assert all(opt.state[p]["mask_stream"].dtype == torch.int64 for p in params)
        return params, opt

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(cpu_adafactor, "available", lambda: False)
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        slow = run()
    _assert_same_run(fast, slow, [(30, 20), (20,)])


def test_a_gradient_a_mask_scales_past_the_float_range_is_stepped_as_by_the_reference(monkeypatch):
    """The inf/NaN check reads the gradient as given, before its mask (as the reference checks it):
    a finite 3e38 that the F mask's 1/p takes to inf is not a reason to skip."""
    shapes = [(20, 30), (50,)]

    def run():
        params = _params(shapes)
        opt = optimfx.AdaFactor(params, child_tuning_mode="F", reserve_p=0.5, seed=1)
        for t in range(2):
            grads = _grads(t, shapes)
            if t == 1:
                grads[0][3] = 3e38
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        return params, opt

    fast, slow = run(), None
    with monkeypatch.context() as m:
        m.setattr(cpu_adafactor, "available", lambda: False)
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        slow = run()
    for (a, b) in zip(fast[0], slow[0]):
        assert int(fast[1].state[a]["step"]) == int(slow[1].state[b]["step"]) == 2
        assert torch.equal(a.isfinite(), b.isfinite())
    assert not fast[0][0].isfinite().all()


@pytest.mark.parametrize("make", [
    lambda ps: optimfx.AdaFactor(ps),
    lambda ps: optimfx.AdamW(ps, child_tuning_mode="F", reserve_p=0.5),
    lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps)),
], ids=["adafactor", "adamw-masked", "eg"])
def test_autograd_sees_the_kernels_in_place_writes(make):
    """A graph that saved a parameter before the step refuses to run backward after it, as after
    any in-place update (the C kernels write through pointers and bump the version counters)."""
    from optimfx._kernels import cpu_adam, cpu_eg

    if not (cpu_adam.available() and cpu_eg.available()):
        pytest.skip("CPU kernels unavailable")
    lin = torch.nn.Linear(64, 64)
    opt = make(list(lin.parameters()))
    x = torch.randn(8, 64, requires_grad=True)
    loss = lin(x).square().sum()
    loss.backward(retain_graph=True)
    version = lin.weight._version
    opt.step()
    assert lin.weight._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_plans_are_kept_for_every_group_and_dropped_when_unused(monkeypatch):
    """Each param group is its own layout: with many groups every plan is built once and reused; the
    plans of a state that ``load_state_dict`` replaced are released after ``PLAN_LIFETIME_CALLS``."""
    built = []
    original = cpu_adafactor._build_plan
    monkeypatch.setattr(cpu_adafactor, "_build_plan", lambda *a: built.append(1) or original(*a))
    cpu_adafactor.free_scratch()
    params = _params([(8, 4)] * 20)
    opt = optimfx.AdaFactor([{"params": [p]} for p in params])
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert len(built) == 20
    opt.load_state_dict(opt.state_dict())  # new state tensors: new layouts
    for _ in range(cpu_adafactor.PLAN_LIFETIME_CALLS // 20 + 2):
        opt.step()
    assert len(built) == 40
    assert len(cpu_adafactor._PLANS) == 20


BF16_CONFIGS = {k: CONFIGS[k] for k in ("paper", "momentum-decay", "fixed-lr", "child-tuning-F", "maximize-momentum")}


def _run_bf16(kwargs: dict, grad_dtype: torch.dtype, steps: int = 4, **extra):
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in _params()]
    for p in params:
        p.grad_dtype = grad_dtype  # fp32 gradients of bf16 parameters (mixed-precision master gradients)
    opt = optimfx.AdaFactor(params, **kwargs, **extra)
    for t in range(steps):
        for p, g in zip(params, _grads(t)):
            p.grad = g.to(grad_dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32], ids=["bf16-grads", "fp32-grads"])
@pytest.mark.parametrize("config", BF16_CONFIGS.values(), ids=BF16_CONFIGS.keys())
def test_bf16_parameters_equal_the_reference(config, grad_dtype, monkeypatch, kernel_numels):
    """bf16 parameters (fp32 maths and state, one rounding to nearest even on write, as the
    reference's write-back): where the fp32 results differ in their last bits, a parameter may round
    to the neighbouring bf16 value, so parameters agree to one bf16 ulp (2^-7 relative, and a few
    ulps of the tensor's update near 0), as in the stacked step's test. That ulp feeds the next
    step's parameter scale, so the fp32 state agrees to 1e-3 relative (observed: ~1e-4)."""
    fast = _run_bf16(config, grad_dtype)
    assert sorted(kernel_numels) == sorted([p.numel() for p in fast[0]] * 4)
    with monkeypatch.context() as m:
        m.setattr(cpu_adafactor, "available", lambda: False)
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        slow = _run_bf16(config, grad_dtype)
    for (a, b, start) in zip(fast[0], slow[0], _params()):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * _scale(b.float() - start.bfloat16().float()))
    for a, b in zip(fast[0], slow[0]):
        for key, value in fast[1].state[a].items():
            if value.is_floating_point():
                assert value.dtype == torch.float32
                ref_value = slow[1].state[b][key]
                torch.testing.assert_close(value, ref_value, rtol=1e-3, atol=1e-3 * _scale(ref_value), msg=key)


def test_bf16_parameters_with_stochastic_rounding_take_the_reference(kernel_numels):
    params = [torch.nn.Parameter(torch.randn(16, 8).bfloat16()), torch.nn.Parameter(torch.randn(16, 8))]
    opt = optimfx.AdaFactor(params, bf16_rounding="stochastic")
    for p in params:
        p.grad = torch.randn(16, 8).to(p.dtype)
    opt.step()
    assert kernel_numels == [128]  # the fp32 one


def test_bf16_rounding_is_round_to_nearest_even():
    """A bf16 parameter is written as the reference writes it back (``Tensor.copy_``): to nearest,
    ties to even, NaN kept NaN, a subnormal and a value near the bf16 maximum included. The step is
    a plain ``θ − 1e-3`` (unfactored, no parameter scale, |U| = 1), whose fp32 results fall between
    bf16 neighbours; the expected values are torch's own rounding of the same fp32 numbers (a
    truncating write fails this test)."""
    values = torch.tensor([1.0, 1.0078125, 1.015625, -3.0, 0.0, float("nan"), 1e-40, 3.3895e38])
    params = [torch.nn.Parameter(values.bfloat16().clone())]
    opt = optimfx.AdaFactor(params, lr=1e-3, relative_step=False, scale_parameter=False, skip_nonfinite=False)
    params[0].grad = torch.full_like(values, 1e-3).bfloat16()
    opt.step()
    expected = (values.bfloat16().float() - 1e-3 * torch.ones_like(values) / (1 + 1e-30) ** 0.5).bfloat16()
    got = params[0].detach()
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])


#: rows of 1 to 2500 columns (pieces and 64-bit words cut short); the second tensor's gradient is
#: zero (``_grads``), the last is a vector (unfactored: hashed, no bits)
KEEP_BITS_SHAPES = [(16, 24), (6, 6), (70, 130), (5, 64), (3, 65), (2, 3, 1), (3, 2500), (40,)]


def _keep_bits_scenario(kernel: bool, monkeypatch):
    """Six F-masked steps with what must not read the bits drawn by the step before: reserve_p changed, a step skipped for an
    inf gradient, a step count set back in place (the kernel's plan and bits stay the same)."""
    shapes = KEEP_BITS_SHAPES
    with monkeypatch.context() as m:
        if not kernel:
            m.setattr(cpu_adafactor, "available", lambda: False)
            m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        params = _params(shapes)
        opt = optimfx.AdaFactor(params, child_tuning_mode="F", reserve_p=0.4, seed=9, beta1=0.9)
        for t in range(6):
            grads = _grads(t, shapes)
            if t == 2:
                opt.param_groups[0]["reserve_p"] = 0.7
            if t == 3:
                grads[2][4, 5] = float("inf")
            if t == 5:
                for p in params:
                    opt.state[p]["step"].sub_(2)
            for p, g in zip(params, grads):
                p.grad = g
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the skipped step's warning
                opt.step()
    return params, opt


def test_f_masks_drawn_a_step_ahead(monkeypatch, kernel_numels):
    """Pass 3 of a step stores the next step's F keep bits, which that step reads instead of hashing
    where they were drawn for its key and reserve_p. Every step of the scenario equals the
    reference's, and the bits were read: inverted before the last step, they change it."""
    shapes = KEEP_BITS_SHAPES
    fast = _keep_bits_scenario(True, monkeypatch)
    assert kernel_numels
    _assert_same_run(fast, _keep_bits_scenario(False, monkeypatch), shapes)

    def last_step_with_inverted_bits(params, opt):
        for plan, _ in cpu_adafactor._PLANS.values():
            at = 0
            for words in plan.keep_words:
                if words:
                    body = plan.keeps[0][at + cpu_adafactor.KEEPS_HEADER:at + words]
                    body.bitwise_not_()
                at += words
        for p, g in zip(params, _grads(6, shapes)):
            p.grad = g
        opt.step()
        return [p.detach().clone() for p in params]

    def run(invert: bool):
        cpu_adafactor.free_scratch()
        params, opt = _keep_bits_scenario(True, monkeypatch)
        if invert:
            return last_step_with_inverted_bits(params, opt)
        for p, g in zip(params, _grads(6, shapes)):
            p.grad = g
        opt.step()
        return [p.detach().clone() for p in params]

    plain, inverted = run(False), run(True)
    # every factored tensor with a gradient read them (the vector hashes, the zero gradient stays 0)
    assert [not torch.equal(a, b) for a, b in zip(plain, inverted)] == [True, False] + [True] * 5 + [False]


def test_keep_bits_of_an_unfinished_update_pass_are_not_read(monkeypatch):
    """The header names the next step's key before pass 3 draws its bits: until the host marks
    them drawn, after pass 3 returns, they are not read. A step whose pass 3 never ran (an
    exception between the passes) leaves the next step hashing: it equals the same step taken
    with a fresh plan, which has no bits at all."""
    from optimfx._kernels import cpu_launcher

    shapes = [(16, 24), (70, 130), (3, 2500)]
    original = cpu_launcher.run

    def run(fresh_plan: bool):
        cpu_adafactor.free_scratch()
        params = _params(shapes)
        opt = optimfx.AdaFactor(params, child_tuning_mode="F", reserve_p=0.4, seed=2)
        for t in range(5):
            for p, g in zip(params, _grads(t, shapes)):
                p.grad = g
            if t == 3:
                def fail_pass_3(kernel, openmp, table, numels, number, *args, **kwargs):
                    if number == 3:
                        raise RuntimeError("interrupted")
                    return original(kernel, openmp, table, numels, number, *args, **kwargs)

                with monkeypatch.context() as m:
                    m.setattr(cpu_launcher, "run", fail_pass_3)
                    with pytest.raises(RuntimeError, match="interrupted"):
                        opt.step()
                (plan, _), = cpu_adafactor._PLANS.values()
                assert bool((plan.keeps[0][plan.keeps[1]] == -1).all())  # marked as being drawn
                if fresh_plan:
                    cpu_adafactor.free_scratch()
                continue
            opt.step()
        return [p.detach().clone() for p in params]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_f_mask_past_a_high_word_of_the_pair_index(monkeypatch):
    """Elements whose pair index passes 2^32 (a tensor of more than 2^33 elements) hash that high
    word too, and a span of the kernel that crosses it restarts there. The tensor's element offset
    is set in the kernel's table (no tensor that large is made): its F-masked steps (the first
    hashing, the second reading the keep bits the first drew) equal, bitwise, its unmasked steps on
    the reference's masks of the same elements."""
    from optimfx.reference import child_tuning as ct

    offset, reserve_p, seed, stream, step = 2**33 - 4097, 0.4, 5, 2, 3
    original_plan = cpu_adafactor._plan

    def at_offset(params, states):
        plan = original_plan(params, states)
        plan.table[:, cpu_adafactor.T_OFFSET] = offset
        return plan

    monkeypatch.setattr(cpu_adafactor, "_plan", at_offset)
    shape = (3, 3001)  # rows longer than a piece, odd: pieces and spans start at odd elements
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    options = cpu_adafactor.Options(weight=0.2, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, step=1e-2, lr=1e-2,
                                    weight_decay=0.0, beta1=0.9, scale_parameter=True, decay_torch=False,
                                    maximize=False)
    runs = []
    for masked_by in ("kernel", "reference"):
        param = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        state = {"exp_avg_sq_row": torch.zeros(3), "exp_avg_sq_col": torch.zeros(3001), "exp_avg": torch.zeros(shape)}
        for t in (step, step + 1):  # the second step's mask from the keep bits the first one drew
            if masked_by == "kernel":
                f_mask = cpu_adafactor.FMask(ct.seed_words(seed)[0], ct.step_word(seed, t), ct.step_word(seed, t + 1),
                                             torch.tensor([stream]), ct.keep_threshold(reserve_p),
                                             ct.keep_scale(reserve_p))
                assert cpu_adafactor.step([param], [grad], [state], options, check_finite=True, f_mask=f_mask)
            else:
                key = ct.mask_key(seed, stream, t)
                masked = ct.bernoulli_grad(grad.reshape(-1), reserve_p, key, offset).reshape(shape)
                assert cpu_adafactor.step([param], [masked], [state], options, check_finite=True)
        runs.append((param, state))
    (p_kernel, s_kernel), (p_ref, s_ref) = runs
    assert torch.equal(p_kernel, p_ref)
    for name in s_kernel:
        assert torch.equal(s_kernel[name], s_ref[name]), name


_BASELINE_ISA_RUN = '''
import warnings, torch, optimfx
from optimfx._kernels import cpu_adafactor, cpu_build
from optimfx.reference import stacking
cpu_build.isa_flags = lambda: ()  # the architecture's baseline: no AVX2 path in the kernel


def run(kernel, mode):
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 24), (70, 130), (3, 65), (3, 2500)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = optimfx.AdaFactor(params, child_tuning_mode=mode, reserve_p=0.4, seed=4, beta1=0.9)
    if mode == "D":
        opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < 0.3 for p in params})
    saved = cpu_adafactor.available, stacking.MAX_STACKED_NUMEL
    if not kernel:
        cpu_adafactor.available, stacking.MAX_STACKED_NUMEL = (lambda: False), 0
    for t in range(4):
        if t == 2:
            opt.param_groups[0]["reserve_p"] = 0.6
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    cpu_adafactor.available, stacking.MAX_STACKED_NUMEL = saved
    return params


assert cpu_adafactor.available(), cpu_build.unavailable_reason("cpu_adafactor")
assert "-mavx2" not in " ".join(cpu_build.BASE_FLAGS + cpu_build.isa_flags())
# rtol as the module's other comparisons (a few steps of reordered sums); atol for entries near 0:
# a few roundings of an update of ~1e-2 relative step size, where a wrong mask or statistic moves
# the parameters by a whole update
for mode in ("F", "D"):
    for a, b in zip(run(True, mode), run(False, mode)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
print("ok")
'''


@pytest.mark.skipif(cpu_build.compiler() is None or not cpu_build.enabled(), reason="no C compiler, or disabled")
def test_a_build_without_vector_extensions_matches_the_reference(tmp_path):
    """The kernel's portable code (what an arm64 or pre-AVX2 machine builds: no AVX2 intrinsics for
    the F keep bits, no AVX2 lowering of the D mask's bytes) steps as the reference does. Built into
    a fresh cache in another process, so this process's AVX2 library is not the one tested."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPTIMFX_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", _BASELINE_ISA_RUN], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
