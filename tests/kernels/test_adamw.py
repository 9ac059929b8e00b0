"""AdamW Triton kernel vs the reference backend (TRITON_INTERPRET=1 on CPU, compiled on CUDA).

Tolerances (kernel vs reference on the same inputs):
* fp32: the kernel rounds its float scalars (1 − β1, β2, c1, c2, ε) to fp32, forms ``lr·c1`` and
  ``1 − lr·λ`` in fp32 and fuses the update in another order; after 3 steps parameters agree to a
  few fp32 ULPs of the update, far inside rtol=1e-5 / atol=1e-7 (the spec's fp32 kernel tolerance, §0.2).
  Both paths see the same masked gradient (bit-identical masks, ``g·(1/p)`` one fp32 product), but
  F mode scales the kept gradients by ``1/p``: where ``m = lerp(m, g̃, 1 − β1)`` cancels, the error is
  a few ULPs of ``|g̃|`` rather than of ``|g|``, so F-mode state gets ``atol = 1e-7/p``.
* bf16/fp16 parameters: both paths compute in fp32 and round once to the parameter dtype; a value
  within fp32 noise of a rounding boundary may round the other way, so parameters agree to one ULP
  of their dtype (rtol = 2^-7 bf16, 2^-10 fp16). The moments depend only on the (identical)
  gradients, so they keep the fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from _device import KERNEL_DEVICE, randn_like

pytest.importorskip("triton")

import optimfx  # noqa: E402
from optimfx._kernels import adamw as adamw_kernels  # noqa: E402

BLOCK = adamw_kernels.BLOCK
SHAPES = [(1,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (3 * BLOCK + 5,), (33, 65), (3, 5, 7), ()]
FP32 = dict(rtol=1e-5, atol=1e-7)
ULP = {torch.float32: FP32, torch.bfloat16: dict(rtol=2**-7, atol=1e-7),
       torch.float16: dict(rtol=2**-10, atol=1e-7)}
CASES = {
    "torch-defaults": (optimfx.AdamW, dict(lr=1e-2)),
    "official-conventions": (optimfx.ChildTuningAdamW, dict(lr=1e-2, weight_decay=0.01)),
    "no-bias-correction-maximize": (optimfx.AdamW, dict(lr=1e-2, correct_bias=False, maximize=True,
                                                        betas=(0.3, 0.99))),
    "eps-v-torch-order": (optimfx.AdamW, dict(lr=1e-2, eps=1e-3, eps_placement="v")),
}
RESERVE_P = 0.3
MODES = {"off": {}, "F": dict(child_tuning_mode="F", reserve_p=RESERVE_P, seed=5), "D": dict(child_tuning_mode="D")}


def _tensors(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(KERNEL_DEVICE) for s in shapes]


def _run(cls, kwargs, init, grads_per_step, backend, masks=None):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, backend=backend, **kwargs)
    if masks is not None:
        opt.set_gradient_mask({params[i]: m for i, m in masks.items()})
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _assert_matches(cls, kwargs, shapes, dtype, mode, steps=3):
    state_tol = dict(FP32, atol=FP32["atol"] / RESERVE_P) if mode == "F" else FP32
    init = _tensors(shapes, dtype, 0)
    grads = [_tensors(shapes, dtype, 1 + t) for t in range(steps)]
    masks = None
    if mode == "D":
        gen = torch.Generator().manual_seed(9)
        masks = {i: (torch.rand(shapes[i], generator=gen) < 0.3).to(KERNEL_DEVICE)
                 for i in range(0, len(shapes), 2)}
    kwargs = {**kwargs, **MODES[mode]}
    if cls is optimfx.ChildTuningAdamW and "child_tuning_mode" in kwargs:
        kwargs["mode"] = kwargs.pop("child_tuning_mode")
    ref_params, ref_opt = _run(cls, kwargs, init, grads, "reference", masks)
    ker_params, ker_opt = _run(cls, kwargs, init, grads, "triton", masks)
    for pr, pk in zip(ref_params, ker_params):
        assert pk.dtype == dtype
        torch.testing.assert_close(pk, pr, **ULP[dtype])
        assert ker_opt.state[pk].keys() == ref_opt.state[pr].keys()
        for key in ("exp_avg", "exp_avg_sq"):
            sr, sk = ref_opt.state[pr][key], ker_opt.state[pk][key]
            assert sk.dtype == torch.float32
            torch.testing.assert_close(sk, sr, **state_tol)


# every mode on the default case, every other case with one mode
@pytest.mark.parametrize("case, mode", [("torch-defaults", m) for m in MODES]
                         + [("official-conventions", "F"), ("no-bias-correction-maximize", "D"),
                            ("no-bias-correction-maximize", "F"), ("eps-v-torch-order", "off")])
def test_odd_shapes_in_one_launch(case, mode):
    cls, kwargs = CASES[case]
    _assert_matches(cls, kwargs, SHAPES, torch.float32, mode)


@pytest.mark.parametrize("dtype, mode", [(torch.bfloat16, m) for m in MODES] + [(torch.float16, "F")])
def test_low_precision_params(dtype, mode):
    cls, kwargs = CASES["official-conventions"]
    _assert_matches(cls, kwargs, [(BLOCK + 1,), (17, 3), ()], dtype, mode, steps=2)


def test_spec_worked_example_d_mode_fp32():
    """spec §4.6 ChildTuning-D, fp32 kernel vs the float64 numbers at the spec's fp32 tolerance."""
    p = torch.nn.Parameter(torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]], device=KERNEL_DEVICE))
    opt = optimfx.ChildTuningAdamW([p], lr=1e-3, eps=1e-6, weight_decay=0.01, mode="ChildTuning-D",
                                   backend="triton")
    opt.set_gradient_mask({p: torch.tensor([[1, 0, 1], [0, 0, 0]], device=KERNEL_DEVICE)})
    for g in ([[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]], [[-0.05, 0.1, 0.2], [0.02, 0.03, -0.04]]):
        p.grad = torch.tensor(g, device=KERNEL_DEVICE)
        opt.step()
    expected = torch.tensor([[0.4987240771, -0.299994, 0.1980258681],
                             [0.09999800001, 0.399992, -0.5999880001]])
    torch.testing.assert_close(p.detach().cpu(), expected, rtol=1e-5, atol=1e-7)


def test_unaligned_noncontiguous_and_mixed_dtypes():
    base = torch.randn(301)
    init = [torch.randn(70), torch.randn(40).bfloat16(), torch.randn(6, 5), base[1:].clone()]
    grads = [[randn_like(p).to(KERNEL_DEVICE) for p in init] for _ in range(3)]
    init = [p.to(KERNEL_DEVICE) for p in init]
    outs = {}
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        storage = torch.zeros(301, device=KERNEL_DEVICE)
        storage[1:] = init[3]
        params[3] = torch.nn.Parameter(storage[1:])  # 4 bytes past an aligned address
        params[2] = torch.nn.Parameter(init[2].clone().t().contiguous().t())
        assert params[3].data_ptr() % 16 != 0 and not params[2].is_contiguous()
        opt = optimfx.AdamW(params, lr=1e-2, child_tuning_mode="F", reserve_p=0.5, backend=backend)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        outs[backend] = params
    for pr, pk in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(pk, pr, **ULP[pr.dtype])


def test_step_counts_that_differ_within_a_group():
    """A parameter that missed steps has its own bias corrections and F masks."""
    init = _tensors([(10,), (12,)], torch.float32, 0)
    outs = {}
    for backend in ("reference", "triton"):
        a, b = (torch.nn.Parameter(p.clone()) for p in init)
        opt = optimfx.AdamW([a, b], lr=1e-2, child_tuning_mode="F", reserve_p=0.5, backend=backend)
        for t in range(4):
            a.grad = torch.full_like(a, 0.1 * (t + 1))
            b.grad = torch.full_like(b, -0.2) if t >= 2 else None
            opt.step()
        outs[backend] = (a, b, opt)
    (ar, br, _), (ak, bk, optk) = outs["reference"], outs["triton"]
    assert int(optk.state[ak]["step"]) == 4 and int(optk.state[bk]["step"]) == 2
    torch.testing.assert_close(ak, ar, **FP32)
    torch.testing.assert_close(bk, br, **FP32)


def test_nonfinite_grad_skips_params_and_moments():
    p = torch.nn.Parameter(torch.randn(BLOCK + 5).to(KERNEL_DEVICE))
    q = torch.nn.Parameter(torch.randn(9).to(KERNEL_DEVICE))
    opt = optimfx.AdamW([p, q], lr=1e-2, child_tuning_mode="F", reserve_p=0.5, backend="triton")
    p.grad, q.grad = randn_like(p), randn_like(q)
    opt.step()
    before = [t.detach().clone() for t in (p, q, opt.state[p]["exp_avg"], opt.state[q]["exp_avg_sq"])]
    bad = randn_like(q)
    bad[3] = float("nan")
    p.grad, q.grad = randn_like(p), bad
    opt.step()
    after = [p, q, opt.state[p]["exp_avg"], opt.state[q]["exp_avg_sq"]]
    for b, a in zip(before, after):
        assert torch.equal(a.detach(), b)


def test_gradients_are_never_written():
    params = [torch.nn.Parameter(torch.randn(s).to(KERNEL_DEVICE)) for s in [(BLOCK + 3,), (4, 4)]]
    opt = optimfx.AdamW(params, lr=1e-2, child_tuning_mode="F", reserve_p=0.3, maximize=True, backend="triton")
    grads = [randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
