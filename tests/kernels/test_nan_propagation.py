"""With ``skip_nonfinite=False`` a NaN gradient poisons what the reference poisons, on the kernels too.

The kernels' floors, clamps and clips must keep NaN as ``torch.clamp`` and ``torch.maximum`` do: a
compiled ``tl.maximum`` returns the other operand of a NaN (PTX ``max.f32``; Triton 3.9's interpreter
does the same), which turned an AdaFactor tensor with one NaN gradient into finite values of ~1e17
instead of NaN. The comparison is of where the NaNs are and of the finite values elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from _device import KERNEL_DEVICE

pytest.importorskip("triton")

import optimfx  # noqa: E402

SHAPES = [(6, 5), (7,)]
# one NaN in the matrix's gradient at the second step
NAN_AT = (1, 0, (2, 3))

OPTIMIZERS = {
    "adafactor": lambda ps, backend: optimfx.AdaFactor(ps, backend=backend, skip_nonfinite=False),
    "adafactor-torch-eps": lambda ps, backend: optimfx.AdaFactor(ps, backend=backend, skip_nonfinite=False,
                                                                 eps_mode="torch", eps=(None, 1e-3)),
    "adafactor-momentum": lambda ps, backend: optimfx.AdaFactor(ps, backend=backend, skip_nonfinite=False,
                                                                beta1=0.9),
    "adamw": lambda ps, backend: optimfx.AdamW(ps, backend=backend, skip_nonfinite=False),
    "eg-sgd": lambda ps, backend: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.1), backend=backend,
                                                     skip_nonfinite=False),
    "eg-adamw": lambda ps, backend: optimfx.EGStepSize(
        optimfx.AdamW(ps, backend=backend, skip_nonfinite=False), backend=backend, skip_nonfinite=False),
}


def _run(make, backend: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(KERNEL_DEVICE)) for s in SHAPES]
    opt = make(params, backend)
    for step in range(3):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            if (step, i) == NAN_AT[:2]:
                g[NAN_AT[2]] = float("nan")
            p.grad = g.to(KERNEL_DEVICE)
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_nan_gradient_poisons_the_kernels_as_the_reference(name):
    ker, ref = _run(OPTIMIZERS[name], "triton"), _run(OPTIMIZERS[name], "reference")
    assert any(r.isnan().any() for r in ref), "the reference should have been poisoned"
    for k, r in zip(ker, ref):
        assert torch.equal(k.isnan(), r.isnan())
        # fp32 tolerance of the kernel tests (tests/kernels/test_eg.py, test_adamw.py)
        torch.testing.assert_close(k[~r.isnan()], r[~r.isnan()], rtol=1e-5, atol=1e-6)
