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
