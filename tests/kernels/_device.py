"""The device the kernel tests run on: CUDA when there is a GPU, else the CPU.

Triton kernels run compiled on CUDA tensors; on a machine without a GPU ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` and they run interpreted on CPU tensors (CI). Without the interpreter a
compiled kernel cannot take CPU tensors, so every tensor a kernel or a ``backend="triton"``
optimizer sees lives on :data:`KERNEL_DEVICE`, and so do the reference runs it is compared with.

Values are drawn on the CPU (a CPU ``torch.Generator``, or the global CPU generator that the
``seed`` fixture resets) and then moved, so CPU and CUDA runs see the same numbers.
"""

from __future__ import annotations

import torch

KERNEL_DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def randn_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(t)`` drawn from the global CPU generator, then moved to ``t``'s device."""
    return torch.randn_like(t, device="cpu").to(t.device)
