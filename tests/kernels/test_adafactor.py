"""AdaFactor Triton kernels vs the reference backend (TRITON_INTERPRET=1 on CPU, compiled on CUDA).

Tolerances (kernel vs reference on the same inputs):
* fp32: the kernels sum squares in a different order (tile partials, then a fixed-order finish;
  torch's norms and means use their own trees), form R_i/R̄ and rsqrt in fp32 like the reference
  but round the host's float64 scalars (w_t, 1 − w_t, ρ_t, λ, β1) to fp32, and apply α/κ as one
  product. Each of RMS(θ), RMS(U), R, C and V̂ is a handful of fp32 roundings away from the
  reference, so the update α·U/κ agrees to ~1e-6 relative and a parameter, which moves by ~1e-2 of
  its RMS per step, to far below rtol=1e-5 after 5 steps. atol=1e-7 covers parameters and momentum
  entries that pass near zero, where an O(1e-2) update cancels an O(1e-2) value (the spec's fp32
  recommendation, §0.2).
* bf16/fp16 parameters: both paths compute in fp32 and round once to the parameter dtype; a result
  within fp32 noise of a rounding boundary may round the other way, so parameters agree to one ULP
  of the parameter dtype (rtol = 2^-7 bf16, 2^-10 fp16). R, C and V depend on the gradients only,
  so they keep the fp32 tolerance; the momentum follows α (RMS θ), so it gets the parameter's rtol.
"""

from __future__ import annotations

import pytest
import torch
from _device import KERNEL_DEVICE

pytest.importorskip("triton")

import optimfx  # noqa: E402
from optimfx._kernels import _launcher  # noqa: E402
from optimfx._kernels import adafactor as adafactor_kernels  # noqa: E402

BR, BC = adafactor_kernels.BR, adafactor_kernels.BC
# (129, 129) spans 5 x 2 tiles of BR x BC = 32 x 128 and (33, 70) two row tiles, so row and column
# partials are finished across tiles; the batched shapes are one tile per slice; flat shapes end mid-row
SHAPES = [(1,), (63,), (2049,), (1, 1), (1, 9), (9, 1), (129, 129), (33, 70), (3, 5, 7), (2, 3, 4, 5), ()]
FP32 = dict(rtol=1e-5, atol=1e-7)
ULP = {torch.bfloat16: dict(rtol=2**-7, atol=1e-7), torch.float16: dict(rtol=2**-10, atol=1e-7)}
CASES = {
    "paper": dict(),
    "external-lr-beta1-decay": dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1),
    "torch-mode": dict(lr=1e-2, eps=(None, 1e-3), weight_decay=0.1, lr_mode="rho_max", eps_mode="torch",
                       decay_mode="torch"),
    "min-dim-4": dict(min_dim_size_to_factor=4),
    "warmup-init": dict(warmup_init=True),
}
STAT_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")


def _tensors(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(KERNEL_DEVICE) for s in shapes]


class _Run:
    """An optimizer over fresh copies of ``init`` (or over ``params``), stepped one gradient list at a time."""

    def __init__(self, init, backend, params=None, **kwargs):
        self.params = params if params is not None else [torch.nn.Parameter(p.clone()) for p in init]
        self.opt = optimfx.AdaFactor(self.params, backend=backend, **kwargs)

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.clone()
        self.opt.step()

    def state(self, i):
        return {k: v for k, v in self.opt.state[self.params[i]].items() if k != "step"}


def _assert_same(ker, ref, param_tol, state_tol=FP32, msg=""):
    for i, (pk, pr) in enumerate(zip(ker.params, ref.params)):
        torch.testing.assert_close(pk.detach(), pr.detach(), **param_tol,
                                   msg=lambda m: f"{msg} param {tuple(pr.shape)}: {m}")
        sk, sr = ker.state(i), ref.state(i)
        assert sk.keys() == sr.keys()
        for key in sk:
            assert sk[key].dtype == torch.float32
            tol = state_tol if key in STAT_KEYS else param_tol
            torch.testing.assert_close(sk[key], sr[key], **tol,
                                       msg=lambda m: f"{msg} {key} {tuple(pr.shape)}: {m}")


def _compare(kwargs, shapes, dtype, steps, check_at, param_tol):
    init = _tensors(shapes, dtype, 0)
    ker, ref = _Run(init, "triton", **kwargs), _Run(init, "reference", **kwargs)
    for t in range(1, steps + 1):
        grads = _tensors(shapes, dtype, t)
        ker.step(grads)
        ref.step(grads)
        if t in check_at:
            _assert_same(ker, ref, param_tol, msg=f"step {t}")


@pytest.mark.parametrize("case", list(CASES))
def test_odd_shapes_in_one_optimizer_fp32(case):
    """Every shape of SHAPES in one optimizer, checked after 1 and after 5 steps."""
    assert 129 > 4 * BR and BC < 129 < 2 * BC
    _compare(CASES[case], SHAPES, torch.float32, 5, (1, 5), FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(dtype):
    _compare(CASES["external-lr-beta1-decay"], SHAPES, dtype, 2, (1, 2), ULP[dtype])


def test_remaining_options():
    """maximize, no parameter scale, a clip threshold above 1, decay-rate and β̂2 cap, tensor lr."""
    kwargs = dict(lr=torch.tensor(3e-2), relative_step=False, scale_parameter=False, maximize=True,
                  clip_threshold=1.5, decay_rate=-0.5, beta2_cap=0.6)
    _compare(kwargs, [(33, 70), (63,), ()], torch.float32, 3, (1, 3), FP32)


def test_spec_worked_example_fp32():
    """spec §1.6, paper defaults: matrix W0 (factored) and vector b0 (unfactored) in one optimizer."""
    w = torch.nn.Parameter(torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]], device=KERNEL_DEVICE))
    b = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3], device=KERNEL_DEVICE))
    opt = optimfx.AdaFactor([w, b], backend="triton")
    steps = [([[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]], [0.01, -0.02, 0.0]),
             ([[-0.05, 0.1, 0.2], [0.02, 0.03, -0.04]], [0.03, 0.01, -0.01])]
    expected = [
        ([[0.4965339935, -0.2961248869, 0.1963237449], [0.09420026176, 0.4, -0.5958989658]],
         [0.0978397531, -0.1978397531, 0.3],
         [0.04666666667, 0.004166666667], [0.00625, 0.02, 0.05], [1e-4, 4e-4, 1e-30]),
        ([[0.4989349595, -0.2987550729, 0.1932099189], [0.09075812756, 0.3971719342, -0.5936669044]],
         [0.09541297425, -0.1991077669, 0.3025247186],
         [0.02991481566, 0.002328749299], [0.003493123948, 0.01164321947, 0.03322900402],
         [0.000559479342, 0.0002276952468, 5.743491775e-05]),
    ]
    for (gw, gb), (ew, eb, row, col, v) in zip(steps, expected):
        w.grad, b.grad = torch.tensor(gw, device=KERNEL_DEVICE), torch.tensor(gb, device=KERNEL_DEVICE)
        opt.step()
        for actual, exp in ((w, ew), (b, eb), (opt.state[w]["exp_avg_sq_row"], row),
                            (opt.state[w]["exp_avg_sq_col"], col), (opt.state[b]["exp_avg_sq"], v)):
            torch.testing.assert_close(actual.detach().cpu(), torch.tensor(exp), **FP32)


ZERO_CASES = {
    "paper": CASES["paper"],
    "torch-mode": CASES["torch-mode"],
    # ε1² = 1e-60 flushes to 0 in fp32: the clamp floors must stay positive (reference ``_floor``)
    "torch-mode-tiny-eps1": dict(lr=1e-2, eps=(1e-30, 1e-3), lr_mode="rho_max", eps_mode="torch"),
    # ε1 = 0 (allowed): R_i, C_j and V of zero rows, columns and entries are 0; R̄/R_i, 1/C_j and 1/V
    # are capped at 1/tiny as in the reference, so a zero gradient stays a zero update
    "paper-eps1-zero": dict(eps=(0.0, 1e-3)),
}


@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_zero_gradients_stay_finite(case):
    """A zero gradient tensor, zero rows and a zero column: finite, and equal to the reference.

    Empty tensors ride along: they are skipped (no tiles), and must not disturb the others.
    """
    shapes = [(5, 6), (6, 5), (2, 4, 3), (7,), (), (0, 3), (0,)]
    init = _tensors(shapes, torch.float32, 0)
    ker, ref = _Run(init, "triton", **ZERO_CASES[case]), _Run(init, "reference", **ZERO_CASES[case])
    for t in range(1, 3):
        grads = _tensors(shapes, torch.float32, t)
        grads[0][1:4] = 0.0
        grads[1][:, 2] = 0.0
        grads[2][1] = 0.0
        grads[3].zero_()
        grads[4].zero_()
        ker.step(grads)
        ref.step(grads)
        for i, p in enumerate(ker.params):
            assert torch.isfinite(p).all() and all(torch.isfinite(s).all() for s in ker.state(i).values())
        _assert_same(ker, ref, FP32, msg=f"step {t}")


def test_two_runs_are_bit_identical():
    shapes = [(65, 130), (33, 70), (2049,), (3, 5, 7)]
    init = _tensors(shapes, torch.float32, 0)
    runs = [_Run(init, "triton", beta1=0.9, weight_decay=0.1) for _ in range(2)]
    for t in range(1, 3):
        grads = _tensors(shapes, torch.float32, t)
        for run in runs:
            run.step(grads)
    for i, (a, b) in enumerate(zip(*(run.params for run in runs))):
        assert torch.equal(a, b)
        for key, value in runs[0].state(i).items():
            assert torch.equal(value, runs[1].state(i)[key])


@pytest.mark.parametrize("copies", [1, 4])
def test_launch_count_is_independent_of_tensor_count(monkeypatch, copies):
    """One step is five launches per launch group (plus the shared non-finite check), however many
    tensors. Launches are counted, not run: the check is about the host side only."""
    launched = []
    monkeypatch.setattr(_launcher, "_enqueue", lambda kernel, grid, *a, **k: launched.append(kernel))
    # row lengths that are multiples of 16 and flat tensors share one group; (5, 1), (9, 7) a second
    aligned = [(16, 32), (2, 8, 48), (40,), (), (5, 1)]
    params = [torch.nn.Parameter(t) for t in _tensors(aligned * copies + [(9, 7)] * copies, torch.float32, 0)]
    opt = optimfx.AdaFactor(params, backend="triton", skip_nonfinite=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    names = [k.__name__ for k in launched]
    assert len(names) == 10
    assert names[:5] == ["adafactor_rowcol_kernel", "adafactor_stats_kernel", "adafactor_rms_kernel",
                         "adafactor_scale_kernel", "adafactor_apply_kernel"]


# (shapes, index of the poisoned gradient, its element, value): a flat (unfactored) tensor, whose
# gradient the rowcol pass reads only to check it, and a factored matrix (rows of 64 elements keep
# every row start 16-byte aligned: one launch group); (9, 7) has rows that are not, so it forms a
# second launch group and the check runs as a separate scan
NONFINITE_CASES = {
    "unfactored-nan": ([(33, 64), (63,), ()], 1, (7,), float("nan")),
    "factored-inf": ([(33, 64), (63,), ()], 0, (5, 9), float("-inf")),
    "two-launch-groups": ([(16, 32), (9, 7), (40,)], 1, (2, 3), float("nan")),
}


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_grad_skips_params_and_all_state(monkeypatch, case):
    shapes, which, element, value = NONFINITE_CASES[case]
    launched = []
    real = _launcher._enqueue

    def spy(kernel, grid, *args, **kwargs):
        launched.append(kernel.__name__)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_launcher, "_enqueue", spy)
    init = _tensors(shapes, torch.float32, 0)
    run = _Run(init, "triton", beta1=0.9)
    run.step(_tensors(shapes, torch.float32, 1))
    # one launch group: the rowcol pass checks the gradients; two: a separate scan first
    separate_scan = "nonfinite_flag_kernel" in launched
    assert separate_scan == (case == "two-launch-groups")
    before = [(p.detach().clone(), {k: v.clone() for k, v in run.state(i).items()})
              for i, p in enumerate(run.params)]
    steps = [int(run.opt.state[p]["step"]) for p in run.params]
    grads = _tensors(shapes, torch.float32, 2)
    grads[which][element] = value
    run.step(grads)
    assert [int(run.opt.state[p]["step"]) for p in run.params] == steps
    for i, (p, state) in enumerate(before):
        assert torch.equal(run.params[i].detach(), p)
        for key, value in state.items():
            assert torch.equal(run.state(i)[key], value)
    # the next finite step goes through
    run.step(_tensors(shapes, torch.float32, 3))
    assert not torch.equal(run.params[0].detach(), before[0][0])


def test_noncontiguous_unaligned_and_missing_grads():
    """A transposed matrix, a parameter at a 4-byte offset, and tensors whose step counts differ."""
    shapes = [(20, 12), (30,), (6, 4)]
    init = _tensors(shapes, torch.float32, 0)
    runs = {}
    for backend in ("reference", "triton"):
        storage = torch.zeros(31, device=KERNEL_DEVICE)
        storage[1:] = init[1]
        params = [torch.nn.Parameter(init[0].t().contiguous().t()), torch.nn.Parameter(storage[1:]),
                  torch.nn.Parameter(init[2].clone())]
        run = _Run(init, backend, params=params, beta1=0.5)
        for t in range(1, 4):
            grads = _tensors(shapes, torch.float32, t)
            grads[2] = grads[2] if t != 2 else None
            run.step(grads)
        runs[backend] = run
    assert not runs["triton"].params[0].is_contiguous()
    assert runs["triton"].params[1].data_ptr() % 16 != 0
    assert int(runs["triton"].opt.state[runs["triton"].params[2]]["step"]) == 2
    _assert_same(runs["triton"], runs["reference"], FP32)



# FSDP2 shards in one process: two ranks that hold the same shard, so the global tensor is the shard
# stacked on itself along dim 0 and an all-reduce (sum) doubles. On the shard, the kernels must give
# the first half of a single-process step on the stacked tensor: every sum over the sharded axis
# (column sums, Σ R, Σθ², ΣU²) completed and every mean divided by the global count. (130, 70) has
# two row bands (RB = 128 rows) and three column jobs, so the folds sum several partials; (2, 5, 7) is
# sharded on its slice axis, (63,) is flat, and (9, 7) is a whole tensor in the same launch.
SHARD_SHAPES = [(130, 70), (2, 5, 7), (63,), (9, 7)]
_RANKS = object()  # the process group of the two ranks (only its identity is used)


def _twin_all_reduce(t, groups, op=None):
    """All-reduce over ranks that hold the same values: a sum doubles, a max keeps them."""
    return t.mul_(2 ** len(groups)) if op is None else t


def _stacked(t):
    return torch.cat([t, t])


def _shard_run(monkeypatch, case, steps, broken_part=None, nan_at=None):
    """``steps`` kernel steps on the shards (the last tensor whole) and reference steps on the stacked
    tensors; returns ``(shards, their states, stacked, their states)``. ``broken_part`` leaves that
    part of the exchange buffer rank-local (its all-reduce skipped). With ``nan_at`` the launches get
    a skip flag and scan the gradients, and step ``nan_at`` has a NaN in the matrix's gradient: the
    kernels must skip it, and the reference steps leave it out."""
    from optimfx import _distributed
    from optimfx.reference import adafactor as ref

    reference_step = ref.step_

    def no_reference(*args):
        raise RuntimeError("a shard took the reference step")

    monkeypatch.setattr(_distributed, "_all_reduce_", _twin_all_reduce)
    monkeypatch.setattr(ref, "step_", no_reference)
    if broken_part is not None:
        real_sum = _distributed.SumLayout.sum_
        monkeypatch.setattr(_distributed.SumLayout, "sum_",
                            lambda self, flat, part: flat if part == broken_part else real_sum(self, flat, part))
    group = optimfx.AdaFactor([torch.nn.Parameter(torch.zeros(1))], **CASES[case]).param_groups[0]
    hp = ref.AdaFactorHyper.from_group(group)
    shards = _tensors(SHARD_SHAPES, torch.float32, 0)
    stacked = [_stacked(p) for p in shards[:-1]] + [shards[-1].clone()]
    shard_states = [ref.init_state(p, hp) for p in shards]
    for p, s in zip(stacked[:-1], shard_states):
        s[_distributed.SHARD_KEY] = _distributed.ShardSpec(tuple(p.shape), ((0, _RANKS),), 0)
    stacked_states = [ref.init_state(p, hp) for p in stacked]
    taken = 0
    for t in range(1, steps + 1):
        grads = _tensors(SHARD_SHAPES, torch.float32, t)
        sc = ref.host_scalars(taken + 1, hp)
        if nan_at is None:
            adafactor_kernels.launch(shards, grads, shard_states, hp, sc, group["lr"])
        else:
            grads[0][3, 5] = float("nan") if t == nan_at else grads[0][3, 5]
            flag = torch.zeros(1, dtype=torch.int32, device=KERNEL_DEVICE)
            adafactor_kernels.launch(shards, grads, shard_states, hp, sc, group["lr"], flag, scan_nonfinite=True)
            assert int(flag[0]) == (t == nan_at)
            if t == nan_at:
                continue
        taken += 1
        for p, g, s in zip(stacked, [_stacked(g) for g in grads[:-1]] + grads[-1:], stacked_states):
            reference_step(p, g, s, hp, sc, group["lr"])
    return shards, shard_states, stacked, stacked_states


def _assert_shard_matches(shards, shard_states, stacked, stacked_states):
    for p, s, pw, sw in zip(shards, shard_states, stacked, stacked_states):
        # the shard is the first half; a column statistic (a matrix's rows split) is the whole one
        for key, value, whole in [("param", p, pw)] + [(k, v, sw[k]) for k, v in s.items() if k != "__shard__"]:
            torch.testing.assert_close(value, whole[:len(value)], **FP32,
                                       msg=lambda m, where=f"{key} of {tuple(p.shape)}": f"{where}: {m}")


@pytest.mark.parametrize("case", ["paper", "external-lr-beta1-decay", "torch-mode"])
def test_fsdp2_shards_match_the_stacked_tensor(monkeypatch, case):
    _assert_shard_matches(*_shard_run(monkeypatch, case, 3))


def test_fsdp2_shard_nonfinite_gradient_skips_the_step(monkeypatch):
    """A skip flag and a gradient scan (a NaN at step 2): the sharded step writes nothing, the next one
    continues as if step 2 had not happened."""
    _assert_shard_matches(*_shard_run(monkeypatch, "external-lr-beta1-decay", 3, nan_at=2))


@pytest.mark.parametrize("part", [0, 1, 2], ids=["column-sums", "row-stat-sum", "param-and-update-sums"])
def test_fsdp2_shards_need_every_exchange(monkeypatch, part):
    """With one part of the exchange left rank-local, the step is wrong: each all-reduce is needed."""
    with pytest.raises(AssertionError, match="not close"):
        _assert_shard_matches(*_shard_run(monkeypatch, "paper", 1, broken_part=part))


def test_fsdp2_shards_of_another_axis_take_the_reference_step(monkeypatch):
    """A shard split on its last axis (a custom FSDP2 placement) is stepped by the reference inside the
    Triton launch, which completes its row means across ranks; the twin ranks give the stacked tensor."""
    from optimfx import _distributed
    from optimfx.reference import adafactor as ref

    monkeypatch.setattr(_distributed, "_all_reduce_", _twin_all_reduce)
    group = optimfx.AdaFactor([torch.nn.Parameter(torch.zeros(1))], **CASES["paper"]).param_groups[0]
    hp = ref.AdaFactorHyper.from_group(group)
    shard, grad = _tensors([(9, 7)], torch.float32, 0)[0], _tensors([(9, 7)], torch.float32, 1)[0]
    stacked = torch.cat([shard, shard], dim=1)
    state, stacked_state = ref.init_state(shard, hp), ref.init_state(stacked, hp)
    state[_distributed.SHARD_KEY] = _distributed.ShardSpec((9, 14), ((1, _RANKS),))
    sc = ref.host_scalars(1, hp)
    adafactor_kernels.launch([shard], [grad], [state], hp, sc, group["lr"])
    ref.step_(stacked, torch.cat([grad, grad], dim=1), stacked_state, hp, sc, group["lr"])
    torch.testing.assert_close(shard, stacked[:, :7], **FP32)
    torch.testing.assert_close(state["exp_avg_sq_row"], stacked_state["exp_avg_sq_row"], **FP32)


@pytest.mark.parametrize("case", ["paper", "torch-mode"])
def test_huge_gradients_match_the_reference(case):
    """Gradients of ~1e12: G² ~ 1e24 and its row and column means are finite in fp32, but the product
    R_i·C_j of torch mode is not (~1e48); V̂ is formed as (R_i/R̄)·C_j, as in the reference."""
    shapes = [(37, 129), (3, 4, 5), (5, 1), (9,)]
    init = _tensors(shapes, torch.float32, 0)
    ker, ref = _Run(init, "triton", **CASES[case]), _Run(init, "reference", **CASES[case])
    for t in range(1, 3):
        grads = [g * 1e12 for g in _tensors(shapes, torch.float32, t)]
        ker.step(grads)
        ref.step(grads)
        assert all(not torch.equal(p, q) for p, q in zip(ker.params, init))
        _assert_same(ker, ref, FP32, msg=f"step {t}")


def test_underflowing_squares_match_the_reference():
    """ε1 = 0 and gradients of ~1e-30 (G² underflows to 0): both backends clip the update as applied."""
    shapes = [(5, 6), (7,)]
    init = _tensors(shapes, torch.float32, 0)
    kwargs = dict(eps=(0.0, 1e-3))
    ker, ref = _Run(init, "triton", **kwargs), _Run(init, "reference", **kwargs)
    for t in range(1, 3):
        grads = [g * 1e-30 for g in _tensors(shapes, torch.float32, t)]
        ker.step(grads)
        ref.step(grads)
        _assert_same(ker, ref, FP32, msg=f"step {t}")
