"""Parameter-shape presets for step benchmarks, and the parameters + gradients to time them on.

A preset is a list of tensor shapes taken from a model layout. ``scale`` shrinks (or grows) every
shape's leading dimension, so the total size scales almost linearly while the number of tensors,
and therefore the per-tensor overhead a benchmark is meant to expose, stays the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Preset:
    """A named list of parameter shapes."""

    name: str
    shapes: tuple[Shape, ...]
    description: str

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def scaled(self, scale: float) -> "Preset":
        """The same layout with every leading dimension multiplied by ``scale`` (at least 1)."""
        if not scale > 0:
            raise ValueError(f"Invalid scale: {scale!r} (must be > 0)")
        if scale == 1.0:
            return self
        shapes = tuple((max(1, round(s[0] * scale)),) + s[1:] for s in self.shapes)
        return Preset(self.name, shapes, self.description)


def gpt2_like(n_layer: int, d_model: int, vocab: int = 50257, n_ctx: int = 1024) -> tuple[Shape, ...]:
    """GPT-2's parameter list (``wte`` tied with the LM head) for a given depth and width."""
    d = d_model
    block = (
        (d,), (d,),            # ln_1 weight, bias
        (d, 3 * d), (3 * d,),  # attn.c_attn
        (d, d), (d,),          # attn.c_proj
        (d,), (d,),            # ln_2 weight, bias
        (d, 4 * d), (4 * d,),  # mlp.c_fc
        (4 * d, d), (d,),      # mlp.c_proj
    )
    return ((vocab, d), (n_ctx, d)) + block * n_layer + ((d,), (d,))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("transformer-50m", gpt2_like(n_layer=8, d_model=512),
               "GPT-2-small layout scaled to ~51.5 M params: 8 layers, d_model 512, vocab 50257; "
               "embeddings, attention/MLP matrices, biases and LayerNorm weights (100 tensors)"),
        Preset("many-small", ((128, 128),) * 1024,
               "1024 x 128x128 (16.8 M params): the per-tensor launch/loop overhead regime"),
        Preset("matrices", ((1024, 1024),) * 16,
               "16 x 1024x1024 (16.8 M params): few large tensors, the bandwidth regime"),
        Preset("smoke", ((64, 64), (64,), (256, 32), (32,), (7, 3), (1,)),
               "six tiny tensors (12.4 K params) for smoke tests"),
    )
}


def get_preset(name: str, scale: float = 1.0) -> Preset:
    """Look a preset up by name and scale it."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None
    return preset.scaled(scale)


def scale_for(preset: Preset, n_params: int) -> float:
    """The ``scale`` that brings ``preset`` to about ``n_params`` parameters."""
    return n_params / preset.numel


def make_params(shapes: Preset | Sequence[Shape], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, *, seed: int = 0) -> list[torch.Tensor]:
    """Leaf parameters with ``.grad`` set, reproducible from ``seed``.

    Values are drawn on the CPU in float32 and then moved, so every device and dtype sees the
    same numbers. Gradients are small (σ = 1e-2) so that repeated steps with a tiny learning rate
    stay finite.
    """
    shapes = shapes.shapes if isinstance(shapes, Preset) else tuple(shapes)
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        p.grad = (torch.randn(shape, generator=gen) * 1e-2).to(device=device, dtype=dtype)
        params.append(p.requires_grad_())
    return params
