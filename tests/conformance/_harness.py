"""Small helpers the conformance tests share: building parameters, stepping, comparing runs."""

from __future__ import annotations

from itertools import chain
from typing import Any, Sequence

import pytest
import torch

from optimfx import _dispatch
from tolerances import assert_close

Tensor = torch.Tensor
SHAPES = [(6, 4), (5,), (0,), ()]  # a matrix, a vector, an empty tensor, a trailing 0-d tensor


def require(backend: str, device: torch.device) -> None:
    """Skip when ``backend`` cannot run on ``device`` here (Triton on CPU needs the interpreter)."""
    if backend == "triton" and device.type == "cpu" and not _dispatch.interpreting():
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")


def make_params(shapes: Sequence[tuple[int, ...]], device: Any = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
            for s in shapes]


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    """Fresh leaves with the same values, dtype, strides and type (Parameter or plain tensor)."""
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device).copy_(p.detach())
        out.append(torch.nn.Parameter(q) if isinstance(p, torch.nn.Parameter) else q.requires_grad_())
    return out


def make_grads(params: Sequence[Tensor], steps: int, seed: int = 1) -> list[list[Tensor]]:
    """``steps`` lists of unit-scale gradients shaped and typed like ``params``."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype).to(p.device)
             for p in params] for _ in range(steps)]


def run(opt: torch.optim.Optimizer, params: Sequence[Tensor], grads: list[list[Tensor | None]]) -> None:
    """One ``step()`` per entry of ``grads``, each parameter getting a private copy of its gradient."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()


class TinyModel(torch.nn.Module):
    """Two linear layers and a trailing 0-d scale parameter (pytorch/pytorch#100701).

    Three distinct shapes only: the compiled backend compiles one graph per shape and step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.scale


def model_and_data(device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyModel().to(device=device, dtype=dtype)
    x = torch.randn(16, 4, device=device, dtype=dtype)
    y = torch.randn(16, 4, device=device, dtype=dtype)
    return model, x, y


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
          steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_entries(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict[str, Any]]:
    """Each parameter's entry in ``opt.state_dict()["state"]`` (``{}`` without one): its state, and for
    a wrapper (EGStepSize) its base's state for the parameter too."""
    index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in opt.param_groups))}
    state = opt.state_dict()["state"]
    return [state.get(index[id(p)], {}) for p in params]


def steps_taken(row: Any, opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[int] | None:
    """Each parameter's step counter (``row.step_key`` of its state entry); ``None`` where the row's
    optimizer keeps none."""
    if row.step_key is None:
        return None
    return [int(entry[row.step_key]) for entry in state_entries(opt, params)]


def assert_runs_equal(opt_a: torch.optim.Optimizer, params_a: Sequence[Tensor],
                      opt_b: torch.optim.Optimizer, params_b: Sequence[Tensor]) -> None:
    """Bitwise equal parameters and per-parameter state (including ``step``, and a wrapper's base state)."""
    entries_a, entries_b = state_entries(opt_a, params_a), state_entries(opt_b, params_b)
    for i, (a, b, sa, sb) in enumerate(zip(params_a, params_b, entries_a, entries_b)):
        assert torch.equal(a.detach(), b.detach()), f"param {i} differs"
        assert sa.keys() == sb.keys(), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            va, vb = sa[key], sb[key]
            assert isinstance(vb, Tensor) and va.dtype == vb.dtype, f"param {i} state {key!r}"
            assert torch.equal(va, vb), f"param {i} state {key!r} differs"


def assert_runs_close(opt: torch.optim.Optimizer, params: Sequence[Tensor], ref_opt: torch.optim.Optimizer,
                      ref_params: Sequence[Tensor], tol_key: str) -> None:
    """Parameters and state (a wrapper's base state too) within the ``tol_key`` tolerance of the
    reference run; integer state (``step``) and state dtypes exactly equal."""
    entries, ref_entries = state_entries(opt, params), state_entries(ref_opt, ref_params)
    for i, (p, r, sp, sr) in enumerate(zip(params, ref_params, entries, ref_entries)):
        assert_close(p.detach(), r.detach(), tol_key, r.dtype, f"param {i}")
        assert sp.keys() == sr.keys(), f"param {i}: state keys {sorted(sp)} != {sorted(sr)}"
        for key in sr:
            assert sp[key].dtype == sr[key].dtype, f"param {i} state {key!r} dtype"
            if not sr[key].is_floating_point():
                assert torch.equal(sp[key], sr[key]), f"param {i} state {key!r}"
            else:
                assert_close(sp[key], sr[key], tol_key, r.dtype, f"param {i} state {key!r}")
