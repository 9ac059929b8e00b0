"""Mixed precision: ``torch.amp.GradScaler`` drives every optimfx optimizer through the fused protocol
(``_step_supports_amp_scaling``), and bf16 parameters keep fp32 state.

With a power-of-two loss scale every gradient is the unscaled one times that power of two (scaling by
``2^k`` commutes with rounding barring overflow and underflow, which unit-scale data never reach), and
the optimizer multiplies by ``2^-k`` exactly. So scaled training is compared with unscaled training
**bit for bit**, on the reference and on the Triton backend (Triton's interpreter on CPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import optimfx
from optimfx import _dispatch

OPTIMIZERS = {
    "AdaX": (optimfx.AdaX, {}),
    "AdaXW": (optimfx.AdaXW, {}),
    "AdaFactor": (optimfx.AdaFactor, {}),
    "AdaFactor-momentum": (optimfx.AdaFactor, {"beta1": 0.9}),
    "AdamW": (optimfx.AdamW, {}),
    "ChildTuningAdamW-F": (optimfx.ChildTuningAdamW, {"mode": "ChildTuning-F", "reserve_p": 0.5}),
}
# one row per Triton kernel (each interpreted Triton step costs ~1 s on CPU)
KERNELS = {"AdaXW", "AdaFactor"}
SCALE = 2.0**12


def _cases():
    out = [pytest.param(name, "reference", id=f"{name}-reference") for name in OPTIMIZERS]
    out += [pytest.param(name, "triton", id=f"{name}-triton") for name in OPTIMIZERS if name in KERNELS]
    return out


def _require(backend: str) -> None:
    if backend == "triton" and not (optimfx.triton_available() and _dispatch.interpreting()):
        pytest.skip("Triton on CPU tensors needs Triton and TRITON_INTERPRET=1")


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _batch(i: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 4, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)


def _loss(model: torch.nn.Module, i: int) -> torch.Tensor:
    x, y = _batch(i, next(model.parameters()).dtype)
    return (model(x) - y).float().square().mean()


def _make(name: str, model: torch.nn.Module, backend: str, **extra) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    return cls(model.parameters(), backend=backend, **{**kwargs, **extra})


def _plain_step(model, opt, i):
    opt.zero_grad()
    _loss(model, i).backward()
    opt.step()


def _scaled_step(model, opt, scaler, i, poison=False):
    opt.zero_grad()
    scaler.scale(_loss(model, i)).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, state


def _assert_same(a, b):
    for pa, pb in zip(a[0], b[0]):
        assert torch.equal(pa, pb)
    for sa, sb in zip(a[1], b[1]):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_optimfx_optimizers_take_part_in_the_fused_amp_protocol():
    for cls, _ in OPTIMIZERS.values():
        assert cls._step_supports_amp_scaling


@pytest.mark.parametrize("name, backend", _cases())
def test_scaled_training_equals_unscaled_training(name, backend):
    _require(backend)
    plain, scaled = _model(), _model()
    opt_plain, opt_scaled = _make(name, plain, backend), _make(name, scaled, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for i in range(2):
        _plain_step(plain, opt_plain, i)
        _scaled_step(scaled, opt_scaled, scaler, i)
    _assert_same(_snapshot(scaled, opt_scaled), _snapshot(plain, opt_plain))
    assert scaler.get_scale() == SCALE


@pytest.mark.parametrize("name, backend, skip_nonfinite",
                         [pytest.param(*c.values, True, id=c.id) for c in _cases()]
                         + [pytest.param("AdaXW", b, False, id=f"AdaXW-{b}-no-skip_nonfinite")
                            for b in ("reference", "triton")])
def test_an_inf_step_changes_nothing_and_the_next_step_is_the_true_next_step(name, backend, skip_nonfinite):
    """GradScaler's ``found_inf`` skips the step whatever ``skip_nonfinite`` says: parameters, state and
    step counts stay as they were (also on Triton, whose flag is read on the device), the scaler backs
    off, and the run continues exactly as a run that never saw the bad batch (a counter advanced by the
    skip would shift every bias correction)."""
    _require(backend)
    clean, hit = _model(), _model()
    opt_clean = _make(name, clean, backend, skip_nonfinite=skip_nonfinite)
    opt_hit = _make(name, hit, backend, skip_nonfinite=skip_nonfinite)
    scaler_clean = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler_hit = torch.amp.GradScaler("cpu", init_scale=2 * SCALE)
    _scaled_step(hit, opt_hit, scaler_hit, 0, poison=True)  # a skipped first step: no state yet
    assert all(not opt_hit.state[p] or int(opt_hit.state[p]["step"]) == 0 for p in hit.parameters())
    assert scaler_hit.get_scale() == SCALE
    _scaled_step(clean, opt_clean, scaler_clean, 0)
    _scaled_step(hit, opt_hit, scaler_hit, 0)
    before = _snapshot(hit, opt_hit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler reports its own skips; optimfx adds no warning
        _scaled_step(hit, opt_hit, scaler_hit, 1, poison=True)
    _assert_same(_snapshot(hit, opt_hit), before)
    assert scaler_hit.get_scale() == SCALE / 2
    scaler_clean.update(SCALE / 2)
    _scaled_step(clean, opt_clean, scaler_clean, 1)
    _scaled_step(hit, opt_hit, scaler_hit, 1)
    _assert_same(_snapshot(hit, opt_hit), _snapshot(clean, opt_clean))
    assert int(opt_hit.state[next(hit.parameters())]["step"]) == 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_scaled_gradients_are_never_written(backend):
    _require(backend)
    model = _model()
    opt = optimfx.AdaXW(model.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler.scale(_loss(model, 0)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unscale_before_step_for_gradient_clipping(backend):
    """``scaler.unscale_(opt)`` then clipping: GradScaler then passes ``found_inf`` but no scale."""
    _require(backend)
    plain, scaled = _model(), _model()
    opt_plain = optimfx.AdaXW(plain.parameters(), backend=backend)
    opt_scaled = optimfx.AdaXW(scaled.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for i in range(2):
        opt_plain.zero_grad()
        _loss(plain, i).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(_loss(scaled, i)).backward()
        scaler.unscale_(opt_scaled)
        torch.nn.utils.clip_grad_norm_(scaled.parameters(), 0.5)
        scaler.step(opt_scaled)
        scaler.update()
    _assert_same(_snapshot(scaled, opt_scaled), _snapshot(plain, opt_plain))


@pytest.mark.parametrize("name, backend", [c for c in _cases() if c.values[0] != "AdaFactor-momentum"])
def test_bf16_parameters_keep_fp32_state_and_round_once(name, backend):
    """One step on bf16 parameters is the fp32 step from the same values, rounded once to nearest even
    (the update runs in fp32 on fp32 state; only the write rounds). AdaFactor with momentum shares
    AdaFactor's precision path, so it is not repeated here."""
    _require(backend)
    low = _model(torch.bfloat16)
    high = _model(torch.bfloat16).float()
    opt_low, opt_high = _make(name, low, backend), _make(name, high, backend)
    _plain_step(low, opt_low, 0)
    for p in low.parameters():
        p_high = high.get_parameter(next(n for n, q in low.named_parameters() if q is p))
        p_high.grad = p.grad.float()
    opt_high.step()
    for p, q in zip(low.parameters(), high.parameters()):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))
        for key, value in opt_low.state[p].items():
            if value.is_floating_point():
                assert value.dtype == torch.float32, key
                assert torch.equal(value, opt_high.state[q][key]), key


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bf16_parameters_with_a_grad_scaler(backend):
    """The autocast-free bf16 recipe: bf16 parameters, bf16 gradients, GradScaler, fp32 state."""
    _require(backend)
    plain, scaled = _model(torch.bfloat16), _model(torch.bfloat16)
    opt_plain = optimfx.AdaXW(plain.parameters(), backend=backend)
    opt_scaled = optimfx.AdaXW(scaled.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for i in range(2):
        _plain_step(plain, opt_plain, i)
        _scaled_step(scaled, opt_scaled, scaler, i)
    _assert_same(_snapshot(scaled, opt_scaled), _snapshot(plain, opt_plain))
    assert all(opt_scaled.state[p]["exp_avg"].dtype == torch.float32 for p in scaled.parameters())
