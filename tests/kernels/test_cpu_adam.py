"""The C kernel of the CPU path (``kernels/cpu_adam.c``): masks bitwise the reference's, the step
equal to the per-tensor reference step to rounding, results independent of the thread split.

Mask checks read the masked gradient back exactly: with ``m = v = θ = 0``, ``β1 = 0`` and no decay
the kernel writes ``m ← 0 + 1·(g̃ − 0) = g̃``, so ``m`` after one call is the masked gradient,
compared bitwise (``torch.equal``, which treats ``−0 = +0``: the reference adds its product to +0).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optimfx._kernels import cpu_adam, cpu_build, cpu_launcher
from optimfx.reference import child_tuning as ct

pytestmark = pytest.mark.skipif(not cpu_adam.available(),
                                reason=f"CPU kernels unavailable: {cpu_build.unavailable_reason('cpu_adam')}")


def _masked_gradient(grad: torch.Tensor, **mask) -> torch.Tensor:
    """``g̃`` as the kernel computes it (see the module docstring)."""
    zeros = [torch.zeros_like(grad) for _ in range(3)]
    cpu_adam.step([zeros[0]], [grad], [zeros[1]], [zeros[2]], lr=0.0, beta1=0.0, beta2=0.5, weight_decay=0.0,
                  eps=1.0, decoupled=True, maximize=False, **mask)
    return zeros[1]


def _f_mask(reserve_p: float, key: int, offset: int) -> dict:
    return dict(mask_mode=cpu_adam.MASK_BERNOULLI, keys=[key], offsets=[offset],
                threshold=ct.keep_threshold(reserve_p), keep_scale=ct.keep_scale(reserve_p))


@pytest.mark.parametrize("reserve_p", [0.3, 0.5, 1e-5, 0.99999])
@pytest.mark.parametrize("n, offset", [(1, 0), (7, 1), (5000, 0), (5001, 3), (70_001, 12_345)])
def test_f_mask_is_bitwise_the_reference_mask(reserve_p, n, offset):
    """Odd offsets start inside a pair; lengths cross the kernel's 2048-element blocks."""
    key = ct.mask_key(seed=7, stream=3, step=11)
    grad = torch.randn(n)
    want = ct.bernoulli_grad(grad, reserve_p, key, offset)
    assert torch.equal(_masked_gradient(grad, **_f_mask(reserve_p, key, offset)), want)


def test_f_mask_across_a_high_word_of_the_pair_index():
    """Pair indices past 2^32 (a shard deep inside a tensor of more than 2^33 elements) hash their
    high word too; a span crossing it takes two blocks."""
    key = ct.mask_key(seed=1, stream=0, step=1)
    offset = 2**33 - 4097
    grad = torch.randn(10_000)
    want = ct.bernoulli_grad(grad, 0.5, key, offset)
    assert torch.equal(_masked_gradient(grad, **_f_mask(0.5, key, offset)), want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_d_mask_multiplies_the_gradient(dtype):
    grad = torch.randn(3001)
    mask = torch.rand(3001) < 0.3
    got = _masked_gradient(grad, mask_mode=cpu_adam.MASK_STORED, masks=[mask.to(dtype)])
    assert torch.equal(got, grad * mask)


def _reference_step(p, g, m, v, *, lr, beta1, beta2, weight_decay, eps, decoupled, maximize):
    """The per-element formula in float64, one rounding to fp32 at the end (the oracle)."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    g = -g if maximize else g
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    return (p - lr * m / (v.sqrt() + eps)).float(), m.float(), v.float()


@pytest.mark.parametrize("decoupled, maximize, weight_decay", [(True, False, 0.0), (True, True, 0.1),
                                                                (False, False, 0.1), (False, True, 0.0)])
def test_unmasked_step_is_the_adam_formula(decoupled, maximize, weight_decay):
    """Tolerance: the kernel evaluates ~10 fp32 operations per element, each within half an ulp;
    8 ulp of the largest value bounds their sum (the float64 oracle rounds once)."""
    torch.manual_seed(0)
    shapes = [(0,), (1,), (33, 65), (4097,)]
    ps = [torch.randn(s) for s in shapes]
    gs = [torch.randn(s) for s in shapes]
    ms = [torch.randn(s) * 0.1 for s in shapes]
    vs = [torch.rand(s) * 0.1 for s in shapes]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=weight_decay, eps=1e-8, decoupled=decoupled,
              maximize=maximize)
    want = [_reference_step(*t, **kw) for t in zip(ps, gs, ms, vs)]
    cpu_adam.step(ps, gs, ms, vs, **kw)
    eps32 = torch.finfo(torch.float32).eps
    for got, exp in zip(zip(ps, ms, vs), want):
        for a, b in zip(got, exp):
            scale = float(b.abs().max()) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=0.0, atol=8 * eps32 * scale)


def test_non_finite_gradients_propagate_as_in_the_reference():
    """No fast-math: NaN and inf gradient entries, kept or dropped by the F mask (``g·0`` is NaN),
    leave NaN and inf exactly where ATen's fused Adam kernel leaves them after the reference's mask."""
    key = ct.mask_key(seed=0, stream=0, step=1)
    grad = torch.randn(4096)
    grad[::7] = float("nan")
    grad[3::7] = float("inf")
    grad[5::7] = -float("inf")
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
    fused = [torch.randn(4096), torch.zeros(4096), torch.zeros(4096)]
    aten = [t.clone() for t in fused]
    cpu_adam.step([fused[0]], [grad], [fused[1]], [fused[2]], decoupled=True, maximize=False, **kw,
                  **_f_mask(0.3, key, 0))
    torch._fused_adamw_([aten[0]], [ct.bernoulli_grad(grad, 0.3, key, 0)], [aten[1]], [aten[2]], [],
                        [torch.tensor(2.0**100)], amsgrad=False, maximize=False, **kw)
    for a, b in zip(fused, aten):
        assert a.isnan().any() and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.isinf(), b.isinf())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "python-threads"])
def test_results_do_not_depend_on_the_thread_split(threads, openmp, monkeypatch):
    """Shares cut tensors at arbitrary even elements; every element is computed alike, whether the
    shares run on torch's OpenMP threads or on Python threads."""
    if openmp and not cpu_adam._LIB.openmp:
        pytest.skip("the kernels are built without OpenMP here")
    def run():
        torch.manual_seed(1)
        shapes = [(1000,), (3, 7), (5001,), (2,), (12_345,)]
        ps, gs = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
        ms, vs = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
        for step in range(1, 4):
            keys = [ct.mask_key(0, i, step) for i in range(len(shapes))]
            cpu_adam.step(ps, gs, ms, vs, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8,
                          decoupled=True, maximize=False, **{**_f_mask(0.4, 0, 0), "keys": keys,
                                                            "offsets": [0] * len(shapes)})
        return ps + ms + vs

    alone = run()
    monkeypatch.setattr(cpu_adam._LIB, "openmp", openmp)
    monkeypatch.setattr(cpu_launcher, "MIN_ELEMENTS_PER_THREAD", 100)
    torch.set_num_threads(threads)
    try:
        split = run()
    finally:
        torch.set_num_threads(2)
    assert all(torch.equal(a, b) for a, b in zip(alone, split))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_task_tables_cover_every_element_once(threads):
    numels = (5, 0, 1000, 3, 77_777)
    tables = cpu_launcher.task_tables(numels, threads)
    assert 1 <= len(tables) <= threads
    covered = {i: [] for i in range(len(numels))}
    for table in tables:
        for tensor, start, end in table.tolist():
            assert start < end and start % 2 == 0
            covered[tensor].append((start, end))
    for i, n in enumerate(numels):
        spans = sorted(covered[i])
        assert sum(e - s for s, e in spans) == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_state_of_another_dtype_or_size_takes_the_per_tensor_step():
    """Moments the kernel cannot read as the parameter's twins (bf16, or another size, from a
    checkpoint of another model) go to the per-tensor step, as without the kernel: bf16 moments step
    (ATen promotes), the wrong size raises a clear error. In subprocesses: a wrong read would crash."""
    code = textwrap.dedent("""
        import torch, optimfx
        for bad in (dict(exp_avg_sq=torch.zeros(4096, dtype=torch.bfloat16)), dict(exp_avg=torch.zeros(10))):
            p = torch.nn.Parameter(torch.randn(4096))
            opt = optimfx.AdamW([p], lr=1e-2, child_tuning_mode="F", reserve_p=0.5)
            p.grad = torch.randn(4096)
            opt.step()
            opt.state[p].update(bad)
            try:
                opt.step()
                print("stepped")
            except RuntimeError:
                print("RuntimeError")
    """)
    outputs = []
    for switch in ("1", "0"):
        env = {**os.environ, "OPTIMFX_CPU_KERNELS": switch}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/",
                             env=env)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout.split())
    assert outputs[0] == outputs[1] == ["stepped", "RuntimeError"]


@pytest.mark.parametrize("decoupled", [True, False])
def test_without_weight_decay_an_inf_parameter_stays_inf(decoupled):
    """ATen skips the decay term when the weight decay is 0: ``0·inf`` would make NaN and poison
    the moments of a coupled-L2 step."""
    p = torch.tensor([float("inf"), -float("inf"), 1.0] * 700)
    g, m, v = torch.ones_like(p), torch.zeros_like(p), torch.zeros_like(p)
    cpu_adam.step([p], [g], [m], [v], lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                  decoupled=decoupled, maximize=False, mask_mode=cpu_adam.MASK_STORED,
                  masks=[torch.ones(p.numel(), dtype=torch.uint8)])
    assert torch.isinf(p[0::3]).all() and torch.isfinite(p[2::3]).all()
    assert torch.isfinite(m).all() and torch.isfinite(v).all()


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "one-thread"])
@pytest.mark.parametrize("n, offset", [(1, 0), (7, 1), (5001, 3), (300_001, 12_345), (10_000, 2**33 - 4097)])
def test_masked_gradient_alone_is_bitwise_the_reference(n, offset, openmp, monkeypatch):
    """``cpu_adam.bernoulli_grad`` (what ``mask_grad`` uses for AdaFactor and the torch.optim adapter)
    against ``child_tuning.bernoulli_grad`` bit for bit, signs of zero included, NaN where it has NaN."""
    if openmp and not cpu_adam._LIB.openmp:
        pytest.skip("the kernels are built without OpenMP here")
    monkeypatch.setattr(cpu_adam._LIB, "openmp", openmp)
    monkeypatch.setattr(cpu_launcher, "MIN_ELEMENTS_PER_THREAD", 1000)
    key = ct.mask_key(seed=3, stream=1, step=7)
    grad = torch.randn(n)
    grad[::97] = -0.0
    grad[5::101] = float("inf")
    grad[7::103] = float("nan")
    got = cpu_adam.bernoulli_grad(grad, key, offset, ct.keep_threshold(0.3), ct.keep_scale(0.3))
    want = ct.bernoulli_grad(grad, 0.3, key, offset)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))


def test_mask_grad_takes_the_kernel_only_for_contiguous_fp32_cpu_gradients():
    key = ct.mask_key(0, 0, 1)
    assert cpu_adam.bernoulli_grad(torch.randn(8, 4).t(), key, 0, 100, 1.0) is None
    assert cpu_adam.bernoulli_grad(torch.randn(8, dtype=torch.float64), key, 0, 100, 1.0) is None
    assert cpu_adam.bernoulli_grad(torch.randn(0), key, 0, 100, 1.0) is None
    state = {"mask_stream": torch.tensor(2), "step": torch.tensor(5)}
    hp = ct.MaskHyper("F", 0.4, 11)
    for grad in (torch.randn(33, 65), torch.randn(65, 33).t()):
        torch.testing.assert_close(ct.mask_grad(grad, state, hp),
                                   ct.bernoulli_grad(grad, 0.4, ct.mask_key(11, 2, 5)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
@pytest.mark.parametrize("n", [1, 2049, 300_001])
def test_stored_masked_gradient_alone_is_bitwise_the_reference(n, dtype):
    grad = torch.randn(n)
    grad[::97] = -0.0
    grad[5::101] = float("inf")
    mask = (torch.rand(n) < 0.3).to(dtype)
    got, want = cpu_adam.stored_mask_grad(grad, mask), ct.apply_mask(grad, mask, 1.0)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))
    assert cpu_adam.stored_mask_grad(grad, mask[:-1] if n > 1 else mask.to(torch.float32)) is None
