"""Compile the kernel variants the optimizers launch for an NVIDIA GPU, on a machine without one.

Run as a script (``tests/kernels/test_compiles_for_gpu.py`` does, in a fresh process): Triton is
pointed at a stand-in driver whose target is ``sm_90``, and the launcher's ``_enqueue`` compiles
each launch with ``kernel.warmup`` (Triton's full pipeline down to ``ptxas``) instead of running it.
The interpreter never compiles, so this is what catches code that only the compiler refuses
(constant specialisation of integer arguments, types of loaded values, unsupported operations).

The cases cover every kernel a single-device step launches (FSDP2's fold kernels are not run here)
in fp32, bf16 and fp16, with and without masks, stochastic rounding, the inf/NaN scan and GradScaler's
scale. Each launch is also compiled with every integer mask argument equal to 1, the value Triton
would otherwise turn into a constant. Prints one JSON object: the kernels compiled and the failures.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402


class _StandInDriver:
    """What ``JITFunction.warmup`` asks of a driver: a target, a device and a stream."""

    target = GPUTarget("cuda", 90, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


driver.set_active(_StandInDriver())

import optimfx  # noqa: E402
from optimfx._kernels import _launcher, _mask  # noqa: E402
from optimfx._kernels import adafactor, adamw, adax, checks, eg  # noqa: E402,F401

# the kernels are compiled (not interpreted) functions now; the dispatch may take CPU tensors
os.environ["TRITON_INTERPRET"] = "1"

COMPILED: set[str] = set()
FAILURES: list[dict[str, str]] = []


def _compile(kernel, grid, *args, **kwargs) -> None:
    name = kernel.fn.__name__
    variants = [(args, kwargs, "")]
    ones = {n: 1 for n in _mask.MASK_SCALARS if n in kernel.arg_names}
    if ones:
        named = dict(zip(kernel.arg_names, args))
        named.update(ones)
        variants.append(((), {**named, **kwargs}, " (integer mask arguments = 1)"))
    for a, k, note in variants:
        try:
            kernel.warmup(*a, grid=grid, **k)
            COMPILED.add(name)
        except Exception:  # noqa: BLE001 - every failure is reported
            FAILURES.append({"kernel": name + note, "error": traceback.format_exc()[-1500:]})


_launcher._enqueue = _compile


def _scaled(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` as ``torch.amp.GradScaler`` leaves it for a step it drives (its ``grad_scale``)."""
    opt.grad_scale = torch.tensor(1024.0)
    return opt


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 64), (5000,), (3, 40, 48), (7,), (9, 7)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _steps(make, dtype: torch.dtype, d_mask: bool = False) -> None:
    params = _params(dtype)
    opt = make(params)
    if d_mask:
        opt.set_gradient_mask({params[0]: torch.rand(params[0].shape) < 0.5})
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


CASES = {
    "adamw": lambda ps: optimfx.AdamW(ps, backend="triton"),
    "adamw-F-alicemind-maximize": lambda ps: optimfx.AdamW(ps, backend="triton", child_tuning_mode="ChildTuning-F",
                                                          reserve_p=0.3, decay_order="alicemind", maximize=True),
    "adamw-D-stochastic": lambda ps: optimfx.AdamW(ps, backend="triton", child_tuning_mode="ChildTuning-D",
                                                  bf16_rounding="stochastic"),
    # GradScaler's protocol: the scale divides the gradients in the unscale kernel
    "adamw-grad-scale": lambda ps: _scaled(optimfx.AdamW(ps, backend="triton")),
    "adax-inside-noskip": lambda ps: optimfx.AdaX(ps, backend="triton", eps_mode="inside", skip_nonfinite=False),
    "adaxw-F-stochastic": lambda ps: optimfx.AdaXW(ps, backend="triton", child_tuning_mode="ChildTuning-F",
                                                  reserve_p=0.3, bf16_rounding="stochastic"),
    "adafactor": lambda ps: optimfx.AdaFactor(ps, backend="triton"),
    "adafactor-momentum-F-stochastic": lambda ps: optimfx.AdaFactor(
        ps, backend="triton", beta1=0.9, child_tuning_mode="ChildTuning-F", reserve_p=0.3,
        bf16_rounding="stochastic"),
    "adafactor-torch-eps-D-noskip": lambda ps: optimfx.AdaFactor(
        ps, backend="triton", eps_mode="torch", eps=(None, 1e-3), child_tuning_mode="ChildTuning-D",
        skip_nonfinite=False),
    "eg-sgd-direct": lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.1), backend="triton"),
    "eg-adamw-raw-global": lambda ps: optimfx.EGStepSize(optimfx.AdamW(ps, backend="triton"), backend="triton",
                                                         normalize=False, gamma_scale=1e-3, gamma_gain=1e-3,
                                                         scope="global"),
    "eg-sgd-momentum-noskip": lambda ps: optimfx.EGStepSize(torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                                            backend="triton", skip_nonfinite=False,
                                                            exp_clip=None, gain_clamp=(None, None)),
}
D_MASKED = {"adamw-D-stochastic", "adafactor-torch-eps-D-noskip"}


def main() -> None:
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if len(sys.argv) < 2 else [getattr(torch, sys.argv[1])]
    for name, make in CASES.items():
        for dtype in dtypes:
            try:
                _steps(make, dtype, d_mask=name in D_MASKED)
            except Exception:  # noqa: BLE001 - a host-side failure is reported as well
                FAILURES.append({"kernel": f"{name} {dtype} (host)", "error": traceback.format_exc()[-1500:]})
    print(json.dumps({"compiled": sorted(COMPILED), "failures": FAILURES}))


if __name__ == "__main__":
    main()
