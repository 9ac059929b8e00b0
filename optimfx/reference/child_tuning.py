r"""ChildTuning gradient masks (``spec/algorithms.md`` §4), applied before the base optimizer's moments.

* ChildTuning-F (task-free): :math:`\tilde g = g \odot M_t / p_F` with a fresh
  :math:`M_t \sim \mathrm{Bernoulli}(p_F)` every step, independent across elements and tensors.
* ChildTuning-D (task-driven): :math:`\tilde g = g \odot M` with a fixed mask from the Fisher
  information, no rescale.

F-mode masks come from a counter-based stream keyed by ``(seed, tensor stream, step)``: the same seed
gives the same masks, a resumed run draws what the uninterrupted run would have, and every DDP rank
draws the same mask without communicating. The stream of this reference (``torch.Generator``) and
that of the Triton kernels (Philox) are different; each is deterministic.

References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and Generalizable
    Fine-tuning <https://arxiv.org/abs/2109.05687>`_, 2021.
"""

from __future__ import annotations

import torch

MODES = (None, "F", "D")
_OFFICIAL_MODE_NAMES = {"ChildTuning-F": "F", "ChildTuning-D": "D"}
_MASK64 = (1 << 64) - 1


def normalise_mode(mode: str | None) -> str | None:
    """Accept the official names (``"ChildTuning-F"``, ``"ChildTuning-D"``) and the short ones."""
    return _OFFICIAL_MODE_NAMES.get(mode, mode) if isinstance(mode, str) else mode


def splitmix64(x: int) -> int:
    """A 64-bit mixing function (Steele et al.), used to derive independent stream keys."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mask_key(seed: int, stream: int, step: int) -> int:
    """The 63-bit key of tensor ``stream``'s F-mode mask at ``step``."""
    return splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ step) >> 1


def bernoulli_keep(shape: torch.Size, reserve_p: float, key: int, device: torch.device) -> torch.Tensor:
    """A boolean keep-mask with ``P(keep) = reserve_p``, drawn from the stream ``key``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(key)
    return torch.rand(shape, generator=gen, device=device) < reserve_p


def apply_mask(grad32: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``g ⊙ keep · scale`` as a new tensor (``scale = 1/p`` for F-mode, 1 for D-mode)."""
    return torch.where(keep, grad32 * scale, torch.zeros((), dtype=grad32.dtype, device=grad32.device))
