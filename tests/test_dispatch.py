"""The host non-finite check used by the reference backends before a step."""

import pytest
import torch

from optimfx._dispatch import all_finite


def test_finite_gradients_pass():
    assert all_finite([torch.randn(5, 7), torch.randn(3), torch.zeros(0)])


def test_huge_but_finite_values_are_not_mistaken_for_overflow():
    # the sum of squares overflows fp32 here; the exact check must still call it finite
    big = torch.full((4,), 3e38)
    assert not torch.linalg.vector_norm(big).isfinite()
    assert all_finite([torch.randn(3), big])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_any_non_finite_element_fails(bad, dtype):
    g = torch.randn(100, dtype=dtype)
    g[37] = bad
    assert not all_finite([torch.randn(3, dtype=dtype), g])


def test_no_gradients_is_finite():
    assert all_finite([]) and all_finite([torch.zeros(0)])
