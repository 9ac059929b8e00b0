"""AdaFactor edge cases: zero rows, empty tensors, invalid combinations, transformers checkpoints."""

from __future__ import annotations

import pytest
import torch

import optimfx


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(lr=1e-2, eps=(1e-30, 1e-3), lr_mode="rho_max", eps_mode="torch", decay_mode="torch"),
    dict(lr=1e-2, eps=(None, 1e-3), lr_mode="rho_max", eps_mode="torch"),
], ids=["paper", "torch-mode-tiny-eps1", "torch-mode"])
def test_zero_rows_and_zero_tensors_stay_finite(kwargs):
    w = torch.nn.Parameter(torch.randn(4, 5))
    z = torch.nn.Parameter(torch.randn(3, 3))
    v = torch.nn.Parameter(torch.randn(6))
    opt = optimfx.AdaFactor([w, z, v], **kwargs)
    for _ in range(3):
        g = torch.randn(4, 5)
        g[1] = 0.0
        w.grad, z.grad, v.grad = g, torch.zeros(3, 3), torch.zeros(6)
        opt.step()
    for p in (w, z, v):
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("shapes", [[(4, 6)], [(4, 6)] * 3], ids=["per-tensor", "stacked"])
def test_clip_bounds_the_update_when_squares_underflow(shapes):
    """ε1 = 0 and gradients of ~1e-30: G² underflows fp32 to 0, so R, C and V are 0 and capped at
    1/tiny, while G·a·b stays ~1e8. The clip must measure the update as applied: RMS(α·Û) ≤ α·d, with
    α = ρ_1·max(ε2, RMS(θ)), within fp32 rounding (float64 moves θ by ~2.5e-2 here)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = optimfx.AdaFactor(params, eps=(0.0, 1e-3), backend="reference")
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-30
    opt.step()
    for p, b in zip(params, before):
        alpha = 1e-2 * max(1e-3, float(b.square().mean().sqrt()))
        assert float((p.detach() - b).square().mean().sqrt()) <= alpha * (1 + 1e-5)


def test_empty_tensor_is_skipped():
    e = torch.nn.Parameter(torch.zeros(0, 4))
    w = torch.nn.Parameter(torch.randn(2, 2))
    opt = optimfx.AdaFactor([e, w])
    e.grad, w.grad = torch.zeros(0, 4), torch.randn(2, 2)
    opt.step()
    assert e.shape == (0, 4) and torch.isfinite(w).all()


def test_relative_step_ignores_nothing_silently():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        optimfx.AdaFactor([p], lr=1e-3)  # transformers raises too: a manual lr with relative_step=True
    with pytest.raises(ValueError, match="decay_mode"):
        optimfx.AdaFactor([p], weight_decay=0.1, decay_mode="torch")
    with pytest.raises(ValueError, match="warmup_init"):
        optimfx.AdaFactor([p], lr=1e-3, relative_step=False, warmup_init=True)
    with pytest.raises(RuntimeError, match="complex"):
        q = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
        q.grad = torch.ones(2, dtype=torch.complex64)
        optimfx.AdaFactor([q]).step()


def test_lr_zero_moves_nothing():
    """DCP's optimizer-state init steps once with lr=0 and zero grads: nothing may move or turn NaN."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = optimfx.AdaFactor([p])
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    p.grad = torch.zeros(3, 4)
    opt.step()
    assert torch.equal(p.detach(), before)


def test_transformers_checkpoint_with_lr_none_loads_and_steps():
    hf = pytest.importorskip("transformers.optimization")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    theirs = hf.Adafactor(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        theirs.step()
    ours = optimfx.AdaFactor(params)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["lr"] == 1.0
    grads = [torch.randn_like(p) for p in params]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs_twin = hf.Adafactor(twin)
    theirs_twin.load_state_dict(theirs.state_dict())
    for p, q, g in zip(params, twin, grads):
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    theirs_twin.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # fp32, different op order
