r"""ChildTuning gradient masks where a kernel loads ``g`` (spec §4.1): :func:`load_grad` and its launch arguments.

A kernel replaces ``load_f32(p_g, ...)`` by ``load_grad(p_g, p_k, ..., MASK_MODE)``::

    NONE       g                                          (the descriptor is never read)
    BERNOULLI  g·(keep ? 1/p : 0), keep = hash(seed, step, stream, element) < T     ChildTuning-F
    STORED     g·mask, mask a 0/1 uint8 tensor (no mask: g)                         ChildTuning-D

The F-mode hash is the one of ``optimfx/reference/child_tuning.py`` (its docstring gives the
keying), in uint32 ops here and int32 torch ops there, so masks are bit-identical on every backend.
It depends on the element index only, never on the block layout, so every pass of a multi-pass
kernel (AdaFactor) that loads ``g`` draws the same mask, and nothing is stored. The index is the
global one: an FSDP2 shard adds its element offset (``ShardSpec.element_offset``, as the reference's
:func:`~optimfx.reference.child_tuning.element_offset`), so its mask is the matching slice of the
single-process one.

Per tensor, the kernel reads a descriptor, int64 ``[stream, word]``: the word is the element offset
in F mode and the D-mask address in D mode (address 0: no D mask); a launch runs one mode, so one
word serves both. Elementwise kernels get the descriptor as one more launcher list (16-byte rows of
a cached table; the launcher's lists hold floating tensors, so the table is kept as float32 bit
patterns), tile kernels as two columns of their plan's meta table (:attr:`MaskLaunch.columns`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ..reference import child_tuning as ct
from . import _launcher
from ._common import load_f32, mix32

#: the integer mask arguments every kernel taking them leaves unspecialised (``do_not_specialize``):
#: Triton compiles an integer argument equal to 1 as a constant (the seed word's bitcast to uint32
#: then fails to compile) and one divisible by 16 as a separate variant; the step changes every step
MASK_SCALARS = ["mask_seed", "mask_step", "mask_threshold"]
NONE = tl.constexpr(0)
BERNOULLI = tl.constexpr(1)
STORED = tl.constexpr(2)
_GOLDEN = tl.constexpr(ct.GOLDEN)
_MUL_A = tl.constexpr(ct.PAIR_MUL_A)
_MUL_B = tl.constexpr(ct.PAIR_MUL_B)
_MUL_C = tl.constexpr(ct.PAIR_MUL_C)


@triton.jit
def bernoulli_keep(o, k0, k1, threshold):
    """``keep`` of int64 element indices ``o`` for tensor keys ``k0``, ``k1`` (uint32) and ``T``."""
    q = o >> 1
    x = q.to(tl.uint32) + k0
    x = x * _MUL_A
    x = x ^ (x >> 16)
    x = (x + (k1 ^ ((q >> 32).to(tl.uint32) * _GOLDEN))) * _MUL_B
    x = x ^ (x >> 16)
    x = x * _MUL_C
    x = x ^ (x >> 16)
    r = (x >> ((o & 1) * 16).to(tl.uint32)) & 0xFFFF
    return (r ^ 0x8000) < threshold


@triton.jit
def tensor_keys(stream, seed_word, step_word):
    """``(k0, k1)`` from the tensor's stream id and the host's seed and step words (int32 bits)."""
    a = mix32(stream.to(tl.uint32, bitcast=True) ^ seed_word.to(tl.uint32, bitcast=True))
    b = step_word.to(tl.uint32, bitcast=True)
    return mix32(a ^ b), mix32((a + b) ^ _GOLDEN)


@triton.jit
def load_grad(p_g, p_d, o, m, mask_seed, mask_step, mask_threshold, mask_scale, MASKED: tl.constexpr,
              MASK_MODE: tl.constexpr):
    """The gradient at offsets ``o`` in fp32, with the ChildTuning mask of ``MASK_MODE`` applied;
    ``p_d`` points to the tensor's descriptor (any element type: it is read as int64)."""
    b_g = load_f32(p_g, o, m, MASKED)
    if MASK_MODE == BERNOULLI:
        p_d = p_d.to(tl.pointer_type(tl.int64), bitcast=True)
        k0, k1 = tensor_keys(tl.load(p_d).to(tl.int32), mask_seed, mask_step)
        # the bits of the global indices: word 1 is the element offset of a shard (0 otherwise)
        keep = bernoulli_keep(o + tl.load(p_d + 1), k0, k1, mask_threshold)
        # a product, as the reference (and the official ``p.grad *= mask``)
        b_g = b_g * tl.where(keep, mask_scale, 0.0)
    elif MASK_MODE == STORED:
        addr = tl.load(p_d.to(tl.pointer_type(tl.int64), bitcast=True) + 1)
        # tensors without a D mask train fully
        if addr != 0:
            b_g = b_g * load_f32(addr.to(tl.pointer_type(tl.uint8)), o, m, MASKED)
    return b_g


class MaskLaunch(NamedTuple):
    """What a launcher adds for :func:`load_grad`: the descriptors, as a launcher list (``aux``) or as
    two meta columns (``columns``: streams, then element offsets (F) or mask addresses (D)), the
    scalar arguments ``(mask_seed, mask_step, mask_threshold, mask_scale)`` and the ``MASK_MODE``
    constexpr."""

    aux: list[torch.Tensor]
    columns: tuple[list[int], list[int]]
    args: tuple[int, int, int, float]
    mode: int


#: ``(device, rows) → one view per row`` of a device table (the views keep the table alive)
_descriptors = _launcher.LRU()


def _signed32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >> 31 else x


def _descriptor_rows(rows: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
    """One float32 ``[4]`` view per ``(stream, word)`` of a cached device table (16-byte rows)."""
    def build() -> list[torch.Tensor]:
        host = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)
        return list(_launcher._to_device(host, device).view(torch.float32).unbind(0))

    return _launcher.cached(_descriptors, (device, tuple(rows)), build)


def prepare(grads: Sequence[torch.Tensor], states: Sequence[dict[str, Any]], hp: ct.MaskHyper) -> MaskLaunch:
    """The :class:`MaskLaunch` of one launch: every tensor has taken the same number of steps.

    ``hp`` is the group's :class:`~optimfx.reference.child_tuning.MaskHyper`; without masks the
    gradient list stands in for the descriptors (never read). A state view of an FSDP2 shard carries
    its ``ShardSpec``, whose element offset F mode adds to the element indices.
    """
    device = grads[0].device
    if hp.bernoulli:
        step = int(states[0]["step"])
        rows = [(int(s["mask_stream"]), ct.element_offset(s)) for s in states]
        seed_word = ct.seed_words(hp.seed)[0]
        args = (_signed32(seed_word), _signed32(ct.step_word(hp.seed, step)), ct.keep_threshold(hp.reserve_p),
                ct.keep_scale(hp.reserve_p))
        return _launch(rows, device, args, int(BERNOULLI))
    if hp.mode == "D" and any("child_mask" in s for s in states):
        rows = [(0, _mask_address(s.get("child_mask"), g)) for s, g in zip(states, grads)]
        return _launch(rows, device, (0, 0, 0, 1.0), int(STORED))
    zeros = [0] * len(grads)
    return MaskLaunch(list(grads), (zeros, zeros), (0, 0, 0, 1.0), int(NONE))


def _launch(rows: list[tuple[int, int]], device: torch.device, args: tuple, mode: int) -> MaskLaunch:
    columns = ([s for s, _ in rows], [a for _, a in rows])
    return MaskLaunch(_descriptor_rows(rows, device), columns, args, mode)


def _mask_address(mask: torch.Tensor | None, grad: torch.Tensor) -> int:
    if mask is None:
        return 0
    if mask.dtype != torch.uint8 or not mask.is_contiguous() or mask.numel() != grad.numel() \
            or mask.device != grad.device:
        raise RuntimeError("child_mask must be a contiguous uint8 tensor with the gradient's numel and device "
                           "(set it with set_gradient_mask)")
    return mask.data_ptr()
