r"""ChildTuning gradient masks, applied where an optimizer loads the gradient.

* ChildTuning-F (task-free): :math:`\tilde g = g \odot M_t / p_F` with a fresh
  :math:`M_t \sim \mathrm{Bernoulli}(p_F)` every step, independent across elements and tensors.
* ChildTuning-D (task-driven): :math:`\tilde g = g \odot M` with a fixed mask from the Fisher
  information (``state["child_mask"]``, uint8), no rescale (the official code's D semantics).

F-mode masks are not drawn from a generator: ``keep(seed, step, stream, element)`` is a
counter-based hash, computed bit-identically here (int32 torch ops) and in the Triton kernels
(``kernels/_mask.py``, uint32 ops), so the same seed gives the same masks on every backend, on every
data-parallel rank and after a resume, with no stored mask and no extra pass. The keying:

* ``stream`` is the parameter's position in the optimizer (``state["mask_stream"]``: groups in order,
  parameters in group order) or the number ``optimfx.set_mask_streams`` gave it
  (``optim/mask_streams.py``), ``step`` its step count (masks repeat after 2^32 steps);
* per tensor and step, two 32-bit keys (:func:`tensor_keys`, lowbias32 ``mix32``)::

      s0, s1 = lo32, hi32 of splitmix64(seed)
      a = mix32(stream ^ s0);  b = mix32(step ^ s1)
      k0 = mix32(a ^ b);       k1 = mix32((a + b) ^ 0x9E3779B9)

* elements are hashed in pairs: pair ``q = e >> 1`` gives 32 bits (:func:`pair_bits`, all mod 2^32)::

      x = (lo32(q) + k0)·0x85EBCA6B;  x ^= x >> 16
      x = (x + (k1 ^ hi32(q)·0x9E3779B9))·0xC2B2AE35;  x ^= x >> 16
      x = x·0x7FEB352D;  x ^= x >> 16

  and element ``e`` keeps the half ``r = (x >> 16·(e & 1)) & 0xFFFF``;
* ``keep = (r ^ 0x8000) < T`` with ``T = round(reserve_p·2^16)`` (:func:`keep_threshold`), so
  ``P(keep) = T/2^16``, within ``2^-17`` of ``reserve_p``; kept entries are scaled by ``2^16/T``
  (:func:`keep_scale`), so the masked gradient is unbiased.

Hashing pairs halves the integer work of the CPU reference; 16 bits per element resolve ``reserve_p``
to ``2^-16``. The mask multiplies the gradient, as the official ``p.grad *= mask`` (an inf/NaN entry
stays NaN where it is dropped). Elements are those of the tensor the optimizer steps: a complex
parameter's real and imaginary parts draw separate F masks and share its D mask; an FSDP2 shard's
elements are numbered by their index in the whole tensor (:func:`element_offset`).

References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and Generalizable
    Fine-tuning <https://arxiv.org/abs/2109.05687>`_, 2021.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .._distributed import SHARD_KEY as _SHARD_KEY
from .._kernels import cpu_adam

MODES = (None, "F", "D")
_OFFICIAL_MODE_NAMES = {"ChildTuning-F": "F", "ChildTuning-D": "D"}
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B9
# pair hash multipliers (MurmurHash3's fmix32 constants, then lowbias32's first)
PAIR_MUL_A, PAIR_MUL_B, PAIR_MUL_C = 0x85EBCA6B, 0xC2B2AE35, 0x7FEB352D
# lowbias32 multipliers (C. Wellons, hash-prospector), the same hash as optimfx._precision.mix32
_MIX_A, _MIX_B = 0x7FEB352D, 0x846CA68B
#: bits of randomness per element: ``P(keep)`` resolves ``reserve_p`` to ``2^-KEEP_BITS``
KEEP_BITS = 16
# pair indices sharing their high word (constant inside one torch chunk)
_CHUNK_PAIRS = 1 << 32


def normalise_mode(mode: str | None) -> str | None:
    """Accept the official names (``"ChildTuning-F"``, ``"ChildTuning-D"``) and the short ones."""
    return _OFFICIAL_MODE_NAMES.get(mode, mode) if isinstance(mode, str) else mode


@dataclass(frozen=True)
class MaskHyper:
    """A parameter group's ChildTuning options (``child_tuning_mode``, ``reserve_p``, ``seed``)."""

    mode: Optional[str] = None
    reserve_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_group(cls, group: dict) -> "MaskHyper":
        return cls(group.get("child_tuning_mode"), float(group.get("reserve_p", 1.0)),
                   int(group.get("seed", 0)))

    @property
    def bernoulli(self) -> bool:
        """F mode with something to drop (``reserve_p = 1`` is the base optimizer exactly)."""
        return self.mode == "F" and self.reserve_p < 1.0


NO_MASK = MaskHyper()


def splitmix64(x: int) -> int:
    """A 64-bit mixing function (Steele et al.), used to derive the seed words."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix32(x: int) -> int:
    """lowbias32 of a 32-bit Python int (``kernels/_common.mix32`` on the device)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MIX_A) & _M32
    x ^= x >> 15
    x = (x * _MIX_B) & _M32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=64)
def seed_words(seed: int) -> tuple[int, int]:
    """``(s0, s1)``: the low and high 32 bits of ``splitmix64(seed)``."""
    s = splitmix64(seed & _M64)
    return s & _M32, s >> 32


@functools.lru_cache(maxsize=1 << 16)
def stream_word(seed: int, stream: int) -> int:
    """``a = mix32(stream ^ s0)``, fixed per tensor (cached: a step asks for every tensor's)."""
    return mix32(stream ^ seed_words(seed)[0])


@functools.lru_cache(maxsize=64)
def step_word(seed: int, step: int) -> int:
    """``b = mix32(step ^ s1)``, shared by every tensor of a step (cached)."""
    return mix32((step & _M32) ^ seed_words(seed)[1])


def tensor_keys(a: int, b: int) -> tuple[int, int]:
    """``(k0, k1)`` of a tensor's mask at a step, from its stream word ``a`` and the step word ``b``."""
    return mix32(a ^ b), mix32(((a + b) & _M32) ^ GOLDEN)


def mask_key(seed: int, stream: int, step: int) -> int:
    """The 64-bit key ``(k1 << 32) | k0`` of tensor ``stream``'s F-mode mask at ``step``."""
    k0, k1 = tensor_keys(stream_word(seed, stream), step_word(seed, step))
    return (k1 << 32) | k0


def keep_threshold(reserve_p: float) -> int:
    """``T = round(reserve_p·2^16)``, at least 1, at most ``2^16 − 1`` below ``reserve_p = 1``."""
    if reserve_p >= 1.0:
        return 1 << KEEP_BITS
    return min(max(round(reserve_p * (1 << KEEP_BITS)), 1), (1 << KEEP_BITS) - 1)


def keep_scale(reserve_p: float) -> float:
    """The rescale of kept entries, ``2^16 / T``: the inverse of the exact keep probability ``T/2^16``,
    so that ``E[g̃] = g`` whatever ``reserve_p`` (``1/reserve_p`` itself is off by up to
    ``2^-17/reserve_p`` relative, 1.5x at ``reserve_p = 1e-5``). Equal to ``1/reserve_p`` when
    ``reserve_p·2^16`` is a whole number (0.5, 0.25, ...)."""
    return (1 << KEEP_BITS) / keep_threshold(reserve_p)


def _signed32(x: int) -> int:
    x &= _M32
    return x - (1 << 32) if x >> 31 else x


def pair_bits(n_pairs: int, key: int, device: torch.device | str = "cpu", first_pair: int = 0) -> torch.Tensor:
    """The 32-bit hashes of pairs ``first_pair … first_pair + n_pairs − 1`` (an int32 tensor).

    int32 arithmetic wraps modulo 2^32 like the kernels' uint32. ``(lo32(q) + k0)·A = A·lo32(q) + A·k0``
    adds a constant to a cached ramp ``A·i``; ``(x + k1)·B`` is one ``add`` with ``alpha=B``; the
    logical ``x ^= x >> 16`` of two int32 lanes at once is an int64 shift, mask and xor.
    """
    k0, k1 = key & _M32, key >> 32
    # an even length, so the buffer has an int64 view
    x = torch.empty(n_pairs + (n_pairs & 1), dtype=torch.int32, device=device)
    done = 0
    while done < n_pairs:
        # a chunk of pairs whose index shares its high word, at most one ramp long (and even)
        q = first_pair + done
        count = min(n_pairs - done, _CHUNK_PAIRS - (q & _M32), _RAMP_PAIRS)
        keys = (q & _M32, k0, k1 ^ ((q >> 32) * GOLDEN & _M32))
        if done & 1:
            # after a chunk ending at a high-word boundary: hash into an aligned buffer
            tmp = torch.empty(count + (count & 1), dtype=torch.int32, device=device)
            _hash_chunk(tmp, *keys)
            x[done:done + count] = tmp[:count]
        else:
            _hash_chunk(x[done:done + count + (count & 1)], *keys)
        done += count
    return x[:n_pairs]


#: ``device → A·i mod 2^32`` (int32) for ``i < _RAMP_PAIRS``, grown on demand
_ramps: dict[torch.device, torch.Tensor] = {}
# longest cached ramp (16 MiB); longer tensors are hashed in chunks of this many pairs (even)
_RAMP_PAIRS = 1 << 22
# the low 16 bits of both int32 lanes of an int64
_LANES_LOW16 = 0x0000FFFF0000FFFF


def _ramp(n: int, device: torch.device) -> torch.Tensor:
    ramp = _ramps.get(device)
    if ramp is None or ramp.numel() < n:
        size = min(max(n, 2 * (0 if ramp is None else ramp.numel())), _RAMP_PAIRS)
        r = torch.arange(size, dtype=torch.int64, device=device).mul_(PAIR_MUL_A).bitwise_and_(_M32)
        ramp = r.sub_(r.bitwise_right_shift(31).bitwise_left_shift_(32)).to(torch.int32)
        _ramps[device] = ramp
    return ramp[:n]


def _hash_chunk(x: torch.Tensor, q_lo: int, k0: int, k1: int) -> None:
    """Hash the pairs ``q_lo + i`` into ``x`` (even length; a trailing odd entry is scratch)."""
    n = x.numel()
    # x = (q_lo + i + k0)·A = A·i + (q_lo + k0)·A
    torch.add(_ramp(n, x.device), _signed32((q_lo + k0) * PAIR_MUL_A), out=x)
    scratch = torch.empty(n // 2, dtype=torch.int64, device=x.device)
    _xorshift16_(x, scratch)
    # x = (x + k1)·B = B·x + B·k1
    torch.add(torch.tensor(_signed32(k1 * PAIR_MUL_B), dtype=torch.int32, device=x.device), x,
              alpha=_signed32(PAIR_MUL_B), out=x)
    _xorshift16_(x, scratch)
    final_round_(x, scratch)


def final_round_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """``x = x·C; x ^= x >> 16``: the third round. The first is linear in the pair index, and two
    rounds left keep bits correlated at fixed spacings (±0.1 at 639,756 elements apart, column keep
    counts of a 768-wide matrix 0.8–0.9 of the binomial variance); a third removes both."""
    x.mul_(_signed32(PAIR_MUL_C))
    _xorshift16_(x, scratch)


def _xorshift16_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """``x ^= x >> 16`` (logical) on int32 ``x`` in place, two lanes per int64 of ``scratch``."""
    wide = x.view(torch.int64)
    torch.bitwise_right_shift(wide, 16, out=scratch)
    wide.bitwise_xor_(scratch.bitwise_and_(_LANES_LOW16))


def _keep_bits(n: int, key: int, device: torch.device | str, offset: int) -> torch.Tensor:
    """The 16 bits of elements ``offset … offset + n − 1`` as int16 (``signed16(r)``)."""
    first_pair = offset >> 1
    n_pairs = ((offset + n + 1) >> 1) - first_pair
    half = offset & 1
    bits = pair_bits(n_pairs, key, device, first_pair)
    if sys.byteorder == "little":
        halves = bits.view(torch.int16)
    else:
        halves = torch.stack((bits.to(torch.int16), (bits >> 16).to(torch.int16)), dim=1).view(-1)
    return halves[half:half + n]


def _signed_threshold(reserve_p: float) -> int:
    # (r ^ 0x8000) < T  ⇔  signed16(r) < T − 2^15
    return keep_threshold(reserve_p) - (1 << (KEEP_BITS - 1))


def bernoulli_keep(shape: torch.Size | tuple[int, ...], reserve_p: float, key: int,
                   device: torch.device | str, offset: int = 0) -> torch.Tensor:
    """The boolean keep-mask of elements ``offset … offset + numel − 1`` for the tensor key ``key``.

    ``P(keep) = keep_threshold(reserve_p) / 2^16``. ``offset`` places the tensor in a longer index
    space (a shard of a larger tensor), so its mask is the matching slice of the whole one.
    """
    bits = _keep_bits(math.prod(shape), key, device, offset)
    return torch.lt(bits, _signed_threshold(reserve_p)).view(shape)


#: elements masked at a time by :func:`apply_mask` and :func:`bernoulli_grad` on a large tensor: a
#: segment's temporaries (hash words, the cast mask) stay in cache for the pass that reads them and are
#: small enough for the allocator to reuse (fresh full-size ones cost more in page faults than the maths)
SEGMENT_NUMEL = 1 << 20


def apply_mask(grad32: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``g ⊙ keep · scale`` as a new tensor (``scale = 1/p`` for F-mode, 1 for D-mode).

    A product, as the official code's ``p.grad *= mask``: an inf/NaN gradient entry stays NaN where
    the mask drops it (the kernels compute ``g·(keep ? scale : 0)`` too).
    """
    if grad32.numel() <= SEGMENT_NUMEL or keep.shape != grad32.shape or not keep.is_contiguous():
        # one pass: the 0/1 mask (bool or uint8) promotes to the gradient's dtype inside the product
        out = torch.mul(grad32, keep)
        return out.mul_(scale) if scale != 1.0 else out
    # a large tensor a segment at a time: the product casts the mask through a temporary as large as
    # its operands, which stays small and cached this way
    out = torch.empty(grad32.shape, dtype=grad32.dtype, device=grad32.device)
    flat_out, flat_grad, flat_keep = out.view(-1), grad32.reshape(-1), keep.view(-1)
    for start in range(0, flat_out.numel(), SEGMENT_NUMEL):
        seg = flat_out[start:start + SEGMENT_NUMEL]
        torch.mul(flat_grad[start:start + seg.numel()], flat_keep[start:start + seg.numel()], out=seg)
    return out.mul_(scale) if scale != 1.0 else out


def bernoulli_grad(grad32: torch.Tensor, reserve_p: float, key: int, offset: int = 0) -> torch.Tensor:
    """``g ⊙ keep / p`` of the F mask with key ``key`` for elements ``offset …``, a segment of
    :data:`SEGMENT_NUMEL` elements at a time: the comparison writes 0/1 floats straight into the
    result, which then takes ``1/p`` and ``g`` in one more pass (no bool tensor)."""
    out = torch.empty(grad32.shape, dtype=grad32.dtype, device=grad32.device)
    flat_out, flat_grad = out.view(-1), grad32.reshape(-1)
    zero = torch.zeros((), dtype=grad32.dtype, device=grad32.device)
    threshold = _signed_threshold(reserve_p)
    for start in range(0, flat_out.numel(), SEGMENT_NUMEL):
        seg = flat_out[start:start + SEGMENT_NUMEL]
        torch.lt(_keep_bits(seg.numel(), key, grad32.device, offset + start), threshold, out=seg)
        # (1/p · keep) · g in one pass: the kernels' g·(keep ? 1/p : 0) rounded once, up to the sign of 0
        torch.addcmul(zero, seg, flat_grad[start:start + seg.numel()], value=keep_scale(reserve_p), out=seg)
    return out


def element_offset(state: dict) -> int:
    """Global index of a tensor's first element, the start of its F-mask bits: an FSDP2 shard's
    ``ShardSpec.element_offset`` (from its state view), so it draws the single-process mask; else 0.

    Raises:
        NotImplementedError: a shard split along another axis than the first (``Shard(1)``...): its
            elements are not one run of the global indices, so it cannot draw the single-process mask.
    """
    shard = state.get(_SHARD_KEY)
    if shard is None:
        return 0
    if shard.element_offset is None:
        axes = sorted({axis for axis, _ in shard.axes})
        raise NotImplementedError(f"ChildTuning-F masks of an FSDP2 parameter sharded along axis {axes} "
                                  "(a placement other than Shard(0)) are not supported: the masks are keyed "
                                  "by global element index, which such a shard does not cover in one run; "
                                  "shard it along dim 0 (fully_shard's default)")
    return shard.element_offset


@torch.compiler.disable
def mask_grad(grad32: torch.Tensor, state: dict, hp: MaskHyper) -> torch.Tensor:
    """The ChildTuning transform of one tensor's working gradient (§4.1), ``grad32`` when off.

    F mode: ``g ⊙ keep / p`` with the counter-based mask of ``(seed, state["step"],
    state["mask_stream"])``; D mode: ``g ⊙ state["child_mask"]`` when the tensor has a mask. The
    result is a new tensor whenever it differs from ``grad32``; ``grad32`` is never written. Runs
    eagerly under ``torch.compile`` (the integer hash stays bit-identical to the kernels'). On a
    contiguous fp32 CPU gradient the masks are applied by the C kernels of
    ``optimfx._kernels.cpu_adam``, bitwise :func:`bernoulli_grad` and :func:`apply_mask` (tested).
    """
    if hp.bernoulli:
        key, offset = mask_key(hp.seed, int(state["mask_stream"]), int(state["step"])), element_offset(state)
        # the CPU path's C kernel gives the same tensor bit for bit, in one pass (where it is built)
        fast = cpu_adam.bernoulli_grad(grad32, key, offset, keep_threshold(hp.reserve_p), keep_scale(hp.reserve_p))
        return fast if fast is not None else bernoulli_grad(grad32, hp.reserve_p, key, offset)
    if hp.mode == "D" and "child_mask" in state:
        mask = state["child_mask"].view(grad32.shape)
        fast = cpu_adam.stored_mask_grad(grad32, mask)
        return fast if fast is not None else apply_mask(grad32, mask, 1.0)
    return grad32
