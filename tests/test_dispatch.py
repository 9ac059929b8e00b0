"""The host non-finite check used by the reference backends before a step."""

import pytest
import torch

import optimfx
from optimfx import _dispatch
from optimfx._dispatch import all_finite


def test_finite_gradients_pass():
    assert all_finite([torch.randn(5, 7), torch.randn(3), torch.zeros(0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_but_finite_values_are_not_mistaken_for_overflow(dtype):
    # fp32: the sum overflows, so the exact check decides; fp16: summed in fp32, no overflow
    big = torch.full((4,), torch.finfo(dtype).max * 0.9, dtype=dtype)
    assert not big.sum().isfinite()
    assert all_finite([torch.randn(3, dtype=dtype), big])


def test_opposite_infinities_in_one_tensor_fail():
    g = torch.randn(10)
    g[2], g[7] = float("inf"), float("-inf")  # their sum is NaN, not inf
    assert not all_finite([g])


def test_half_precision_sums_do_not_overflow_into_the_exact_check(monkeypatch):
    # 70,000 fp16 ones sum past fp16's max (65504): the sum must run in fp32 to stay the cheap check
    calls = []
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a: calls.append(a) or [torch.tensor(1.0)])
    assert all_finite([torch.ones(70_000, dtype=torch.float16)]) and not calls


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_any_non_finite_element_fails(bad, dtype):
    g = torch.randn(100, dtype=dtype)
    g[37] = bad
    assert not all_finite([torch.randn(3, dtype=dtype), g])


def test_no_gradients_is_finite():
    assert all_finite([]) and all_finite([torch.zeros(0)])


@pytest.mark.parametrize("make", [
    optimfx.AdamW, optimfx.AdaXW, optimfx.AdaFactor,
    lambda ps: optimfx.ChildTuningAdamW(ps, mode="ChildTuning-F", reserve_p=0.3),
    lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.1)),
    lambda ps: optimfx.Funnel(ps),
    lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps)),
], ids=["AdamW", "AdaXW", "AdaFactor", "ChildTuningAdamW-F", "EG-SGD", "Funnel", "EG-AdamW"])
def test_a_step_on_meta_parameters_traces(make):
    """Shape-tracing and FLOP-counting tools step optimizers on the meta device, as torch.optim's
    allow: the default inf/NaN check must not read values there (meta tensors have none)."""
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    opt = make(model.parameters())
    model(torch.randn(2, 4, device="meta")).sum().backward()
    opt.step()
    assert all(p.device.type == "meta" for p in model.parameters())


def test_triton_takes_one_device_per_param_group(monkeypatch):
    """A group spread over devices (model parallelism, ``device_map="auto"``) cannot be one launch:
    ``"auto"`` keeps it on the reference backend and ``"triton"`` says why. CPU and meta tensors
    stand in for two GPUs (the device check comes before the CUDA one)."""
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    params = [torch.zeros(3), torch.zeros(3, device="meta")]
    assert _dispatch.resolve_backend("auto", params) == "reference"
    with pytest.raises(RuntimeError, match=r"one device's tensors per param group, got \['cpu', 'meta'\]"):
        _dispatch.resolve_backend("triton", params)
