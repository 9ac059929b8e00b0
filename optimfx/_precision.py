"""Precision policy: optimizer maths and state in fp32 whatever the parameter dtype.

* bf16/fp16 parameters are up-cast for the update and rounded once when written back.
* Optimizer state is fp32 (fp64 for fp64 parameters, so the reference can run in float64).
* ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to the parameter's dtype;
  :func:`restore_state_dtypes` undoes that for optimfx state (see ``FxOptimizer.load_state_dict``).
"""

from __future__ import annotations

import torch


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the update maths runs in, and the dtype of floating optimizer state."""
    return torch.float64 if param_dtype in (torch.float64, torch.complex128) else torch.float32


def real_view(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are optimised as their ``(..., 2)`` real view, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


def working_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it already has the compute dtype, else an up-cast copy."""
    target = compute_dtype(t.dtype)
    return t if t.dtype == target else t.to(target)


def write_back_(param: torch.Tensor, param32: torch.Tensor) -> None:
    """Round the fp32 working copy into the parameter once (no-op when they alias)."""
    if param32 is not param:
        param.copy_(param32)


def state_like(param: torch.Tensor) -> torch.Tensor:
    """A zero state buffer shaped like ``param``'s real view, in the policy dtype."""
    view = real_view(param)
    return torch.zeros(view.shape, dtype=compute_dtype(param.dtype), device=param.device)
