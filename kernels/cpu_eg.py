"""Host side of ``cpu_eg.c``: EG step-size adaptation's own passes over fp32 CPU tensors.

The reference takes about a dozen ATen passes per step besides the base's (sums, the gains'
exponent, clip, ``exp``, product and clamp, the average gradient, the saved parameters, the
step read back, velocity, parameter); here they are three, each one read of its operands:

* :func:`alignment_parts`: the rows ``(⟨ν, g⟩, ‖ν‖², ‖g‖², ‖m‖²)`` of
  :func:`optimfx.reference.eg.alignment_parts`, summed in fp32 lanes over fixed chunks, the chunks in float64;
* :func:`adapt`: gains and average gradient, and the parameters saved for the base's step, or,
  with a plain SGD base (``direct``), the whole step;
* :func:`apply`: after the base's step, ``d``, the velocity and the parameters;
* :func:`adam_step`: for an Adam-family base whose step is ATen's fused Adam (optimfx's ``AdamW`` and
  ``AdaX``, :mod:`optimfx.reference.aten_fused`), adapt, the base's step and apply in one pass: the
  proposal ``θ − d`` is formed in registers and never stored, nor is ``θ`` saved (the passes around a
  base step move 28 + 28 + 24 B per fp32 element besides the sums, this one 52).

Scales stay 0-d tensors read by the kernel; the scale exponents and gain coefficients are formed
by the reference's functions on the host, from the sums. Each pass equals the reference's ATen ops
to rounding (``exp`` within an ulp; the sums in another order and precision).
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional, Sequence

import torch

from . import cpu_build, cpu_launcher

Tensor = torch.Tensor
NAME = "cpu_eg"
#: elements per partial sum (``CHUNK`` in ``cpu_eg.c``)
CHUNK = 16384
_DIRECT, _FRESH_VELOCITY, _SGD_DECAY = 1, 2, 4
_STATE_KEYS = ("gains", "velocity", "avg_grad")
_LIB = cpu_build.Library(NAME, {
    "optimfx_eg_sums": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None),
    "optimfx_eg_adapt": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_int64], None),
    "optimfx_eg_apply": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64], None),
    "optimfx_eg_adam": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int64], None),
})
available = _LIB.available


_plain = cpu_build.plain


def takes(param: Tensor, grad: Tensor, state: dict) -> bool:
    """fp32 CPU tensors, contiguous and of one size: the parameter, its gradient and its EG state
    (a state of another size or dtype, loaded from a checkpoint, takes the reference, which says
    what is wrong)."""
    scale, n = state["scale"], param.numel()
    tensors = (param, grad, *(state[k] for k in _STATE_KEYS))
    return (all(_plain(t) and t.numel() == n for t in tensors) and _plain(scale) and scale.dim() == 0)


def _table(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict],
           saved: Optional[Sequence[Tensor]] = None, base_states: Optional[Sequence[dict]] = None) -> Tensor:
    rows: list[int] = []
    chunk_base = 0
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        moments = (0, 0) if base_states is None else (base_states[i]["exp_avg"].data_ptr(),
                                                       base_states[i]["exp_avg_sq"].data_ptr())
        rows += (p.data_ptr(), g.data_ptr(), s["gains"].data_ptr(), s["velocity"].data_ptr(),
                 s["avg_grad"].data_ptr(), 0 if saved is None else saved[i].data_ptr(), s["scale"].data_ptr(),
                 chunk_base, *moments)
        chunk_base += -(-p.numel() // CHUNK)
    return torch.tensor(rows, dtype=torch.int64)


@functools.lru_cache(maxsize=256)
def _chunk_owners(chunks: tuple[int, ...]) -> Tensor:
    """The tensor each chunk sum belongs to (chunks of a tensor are consecutive)."""
    return torch.tensor([i for i, c in enumerate(chunks) for _ in range(c)], dtype=torch.int64)


def alignment_parts(grads: Sequence[Tensor], states: Sequence[dict]) -> Tensor:
    """``[T, 4]`` float32 rows ``(⟨ν, g⟩, ‖ν‖², ‖g‖², ‖m‖²)`` (``ν, m`` of the previous step)."""
    numels = [g.numel() for g in grads]
    chunks = [-(-n // CHUNK) for n in numels]
    out = torch.zeros(max(sum(chunks), 1), 4, dtype=torch.float64)
    table = _table(grads, grads, states)
    kernel = _LIB.function("optimfx_eg_sums")
    cpu_launcher.run(kernel, _LIB.openmp, table, numels, ctypes.c_void_p(out.data_ptr()), align=CHUNK)
    owner = _chunk_owners(tuple(chunks))
    sums = torch.zeros(len(grads), 4, dtype=torch.float64).index_add_(0, owner, out[:len(owner)])
    return sums.to(torch.float32)


def _scalars(hp, sgd_lr: float = 0.0, sgd_decay: float = 0.0) -> ctypes.Array:
    clip = math.inf if hp.exp_clip is None else hp.exp_clip
    low = -math.inf if hp.gain_min is None else hp.gain_min
    high = math.inf if hp.gain_max is None else hp.gain_max
    return (ctypes.c_double * 8)(hp.beta, clip, low, high, hp.momentum, hp.lr, sgd_lr, sgd_decay)


def _flags(hp, direct: bool = False, sgd_decay: float = 0.0) -> int:
    fresh = hp.momentum == 0.0 and hp.lr == 1.0
    return (_DIRECT if direct else 0) | (_FRESH_VELOCITY if fresh else 0) | (_SGD_DECAY if sgd_decay != 0.0 else 0)


def adapt(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict],
          saved: Optional[Sequence[Tensor]], coefficients: Sequence[float], hp, *, direct: bool = False,
          sgd_lr: float = 0.0, sgd_decay: float = 0.0) -> None:
    """Gains ``p ← clamp(p·exp(clip(c·m ⊙ g)))`` with each tensor's ``c`` in ``coefficients``, then
    ``m ← lerp(m, g, 1 − β)``; then ``saved ← θ`` or, ``direct`` (``saved`` is ``None``), the
    plain SGD step ``d = lr·(g + λθ)``, ``ν ← μν + η·p ⊙ d``, ``θ ← θ − s·ν`` (the scales already
    updated)."""
    if (saved is None) != direct:
        raise ValueError("cpu_eg.adapt: saved buffers are written unless the step is direct")
    table = _table(params, grads, states, saved)
    coefs = torch.tensor(list(coefficients), dtype=torch.float64)
    kernel = _LIB.function("optimfx_eg_adapt")
    cpu_launcher.run(kernel, _LIB.openmp, table, [p.numel() for p in params],
                     ctypes.c_void_p(coefs.data_ptr()), _scalars(hp, sgd_lr, sgd_decay),
                     _flags(hp, direct, sgd_decay))
    cpu_build.written([*params, *(s[k] for s in states for k in _STATE_KEYS), *(saved or ())])


def apply(params: Sequence[Tensor], states: Sequence[dict], saved: Sequence[Tensor], hp) -> None:
    """After the base's step (``params`` hold ``θ − d``): ``d = saved − θ``, ``ν ← μν + η·p ⊙ d``,
    ``θ ← θ + (d − s·ν)``."""
    table = _table(params, params, states, saved)
    kernel = _LIB.function("optimfx_eg_apply")
    cpu_launcher.run(kernel, _LIB.openmp, table, [p.numel() for p in params], _scalars(hp), _flags(hp))
    cpu_build.written([*params, *(s["velocity"] for s in states)])


def takes_base_state(param: Tensor, base_state: dict) -> bool:
    """Whether :func:`adam_step` can step the base's moments of ``param`` with it: ``exp_avg`` and
    ``exp_avg_sq`` fp32, contiguous and of its size (the EG side: :func:`takes`)."""
    n = param.numel()
    return all(isinstance(base_state.get(k), Tensor) and _plain(base_state[k]) and base_state[k].numel() == n
               for k in ("exp_avg", "exp_avg_sq"))


def adam_step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict],
              base_states: Sequence[dict], coefficients: Sequence[float], hp, args) -> None:
    """:func:`adapt`, the base's step and :func:`apply` in one pass, for a base whose step is ATen's
    fused Adam with the scalars ``args`` (:class:`optimfx.reference.aten_fused.FusedAdamArguments`;
    its ``maximize`` is not read: ``grads`` carry EG's sign already). ``base_states`` hold the base's
    ``exp_avg`` and ``exp_avg_sq``, updated as the base's step updates them; the scales are already
    updated. Each element's proposal ``θ − d`` is that of ``optimfx._kernels.cpu_adam`` (within a few
    ulp of ATen's kernel) and ``d = θ − (θ − d)`` is taken as :func:`apply` takes it."""
    table = _table(params, grads, states, None, base_states)
    coefs = torch.tensor(list(coefficients), dtype=torch.float64)
    adam = (ctypes.c_double * 6)(args.lr, args.beta1, args.beta2, args.weight_decay, args.eps,
                                 1.0 if args.decoupled else 0.0)
    kernel = _LIB.function("optimfx_eg_adam")
    cpu_launcher.run(kernel, _LIB.openmp, table, [p.numel() for p in params], ctypes.c_void_p(coefs.data_ptr()),
                     _scalars(hp), adam, _flags(hp))
    cpu_build.written([*params, *(s[k] for s in states for k in _STATE_KEYS),
                       *(s[k] for s in base_states for k in ("exp_avg", "exp_avg_sq"))])
