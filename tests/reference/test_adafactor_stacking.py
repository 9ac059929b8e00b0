"""AdaFactor's stacked reference step (``optimfx/reference/stacking.py``) equals the per-tensor step.

Both runs take the same gradients; the per-tensor run has stacking switched off
(``MAX_STACKED_NUMEL = 0``). The stacked step sums rows, columns and RMS values of a whole stack at
once, which may add in another order than per tensor, so fp32 results agree to rounding, not
bitwise: ``rtol=1e-5`` is ~80 fp32 ulps, room for a few steps of reordered sums (observed: ≤ 4 ulps)
while a wrong per-slice scale (a stack-wide RMS) is off by percents. bf16 parameters may round to
the neighbouring bf16 value when the fp32 results differ in the last bits: one bf16 ulp (2^-7
relative) is allowed there. Momentum entries that nearly cancel get a large *relative* error from
an absolute one of a few ulps of the tensor's scale (observed ≤ 1e-9 on entries up to 7e-3), hence
``atol=1e-8`` for the state. The C kernel, which takes fp32 groups before any stacking where it is
built, is switched off here (``test_adafactor_cpu_kernel.py`` tests it).
"""

from __future__ import annotations

import pytest
import torch

import optimfx
from optimfx.reference import stacking

pytestmark = pytest.mark.usefixtures("without_adafactor_kernel")

#: several tensors per shape (stacked), shapes met once (stepped alone), one over the stacking size
SHAPES = [(16, 24)] * 5 + [()] * 3 + [(3, 5, 7)] * 4 + [(40,)] * 6 + [(1, 9)] * 3 + [(9, 1)] * 2 + [(130, 7)] + [(400, 400)]

CONFIGS = {
    "paper": dict(),
    "momentum-decay": dict(beta1=0.9, weight_decay=0.1),
    "fixed-lr": dict(lr=1e-3, relative_step=False, scale_parameter=False),
    "torch-mode": dict(lr=1e-2, eps=(None, 1e-3), lr_mode="rho_max", eps_mode="torch", decay_mode="torch",
                       weight_decay=0.01),
    "partly-unfactored": dict(min_dim_size_to_factor=8),
    "child-tuning-F": dict(child_tuning_mode="F", reserve_p=0.4, seed=3),
    "maximize": dict(maximize=True),
}


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in SHAPES]
    grads[1][3] = 0.0  # a zero row inside a stack
    grads[9].zero_()  # a whole zero tensor inside a stack
    return grads


def _run(kwargs: dict, dtype: torch.dtype, steps: int = 5, frozen_at: int | None = None):
    params = _params(dtype)
    opt = optimfx.AdaFactor(params, **kwargs)
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, _grads(t))):
            # a tensor without a gradient at one step falls one step behind: stacks split by step count
            p.grad = None if t == frozen_at and i % 2 else g.to(dtype)
        opt.step()
    return params, opt


def _assert_same_run(stacked, alone, dtype):
    (ps, opt_s), (pa, opt_a) = stacked, alone
    rtol, atol = (1e-5, 1e-8) if dtype == torch.float32 else (2 ** -7, 1e-6)
    for a, b in zip(ps, pa):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        assert torch.isfinite(a).all()
    for a, b in zip(ps, pa):
        sa, sb = opt_s.state[a], opt_a.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype, key
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-8, msg=key)


@pytest.fixture
def count_chunks(monkeypatch):
    """Record the tensors of every stacked chunk (the test would prove nothing if none were stacked)."""
    seen: list[int] = []
    original = stacking.step_chunk

    def spy(step_fn, params, *args):
        seen.append(len(params))
        return original(step_fn, params, *args)

    monkeypatch.setattr(stacking, "step_chunk", spy)
    return seen


def _unstacked(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(stacking, "MAX_STACKED_NUMEL", 0)
        return fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_stacked_step_equals_per_tensor_step(config, dtype, monkeypatch, count_chunks):
    stacked = _run(config, dtype)
    assert count_chunks and max(count_chunks) >= 2
    count_chunks.clear()
    alone = _unstacked(monkeypatch, lambda: _run(config, dtype))
    assert not count_chunks
    _assert_same_run(stacked, alone, dtype)


def test_tensors_with_different_step_counts_are_stacked_apart(monkeypatch, count_chunks):
    stacked = _run(CONFIGS["momentum-decay"], torch.float32, frozen_at=2)
    steps = {int(s["step"]) for s in stacked[1].state.values()}
    assert steps == {4, 5}
    alone = _unstacked(monkeypatch, lambda: _run(CONFIGS["momentum-decay"], torch.float32, frozen_at=2))
    _assert_same_run(stacked, alone, torch.float32)


def test_child_tuning_d_masks_apply_per_tensor_in_a_stack(monkeypatch, count_chunks):
    def run():
        params = _params(torch.float32)
        opt = optimfx.AdaFactor(params, child_tuning_mode="D")
        gen = torch.Generator().manual_seed(7)
        # masks on some tensors of the (16, 24) stack only: the others take the plain step
        opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < 0.5 for p in params[:3]})
        for t in range(3):
            for p, g in zip(params, _grads(t)):
                p.grad = g
            opt.step()
        return params, opt

    stacked = run()
    assert count_chunks
    _assert_same_run(stacked, _unstacked(monkeypatch, run), torch.float32)


def test_chunks_hold_at_most_chunk_bytes_of_parameters():
    params = [torch.zeros(128, 128) for _ in range(40)] + [torch.zeros(1000) for _ in range(300)]
    grads = [torch.zeros_like(p) for p in params]
    states = [{"exp_avg_sq_row": torch.zeros(1)} for _ in params]
    chunks, alone = stacking.stack_groups(params, grads, states, [1] * len(params), stochastic_bf16=False)
    assert sorted(i for c in chunks for i in c) == list(range(len(params))) and not alone
    for chunk in chunks:
        assert len(chunk) >= 2 and 4 * sum(params[i].numel() for i in chunk) <= stacking.CHUNK_BYTES


def test_what_is_left_to_the_per_tensor_step():
    big = torch.zeros(stacking.MAX_STACKED_NUMEL + 1)
    params = [torch.zeros(0, 3), torch.zeros(0, 3), big, big.clone(), torch.zeros(4, 4, dtype=torch.bfloat16),
              torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(5), torch.zeros(5)]
    grads = [torch.zeros_like(p) for p in params]
    states = [{} for _ in params]
    chunks, alone = stacking.stack_groups(params, grads, states, [1] * 8, stochastic_bf16=True)
    # empty and oversized tensors, and bf16 written with stochastic rounding (keyed per tensor)
    assert alone == [0, 1, 2, 3, 4, 5] and chunks == [[6, 7]]
    chunks, alone = stacking.stack_groups(params, grads, states, [1] * 8, stochastic_bf16=False)
    assert alone == [0, 1, 2, 3] and sorted(chunks) == [[4, 5], [6, 7]]


def test_stacked_step_reads_gradients_only():
    params = _params(torch.float32)
    grads = _grads(0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimfx.AdaFactor(params, child_tuning_mode="F", reserve_p=0.5, maximize=True).step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
