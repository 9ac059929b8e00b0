"""optimfx: fused PyTorch optimizers with a plain-PyTorch reference and Triton kernels."""

from ._dispatch import resolve_backend, triton_available
from ._version import __version__
from .fisher import build_fisher_mask
from .optim import AdaFactor, AdamW, AdaX, AdaXW, ChildTuning, ChildTuningAdamW, EGStepSize, Funnel
from .optim.mask_streams import set_mask_streams

__all__ = ["AdaFactor", "AdamW", "AdaX", "AdaXW", "ChildTuning", "ChildTuningAdamW", "EGStepSize", "Funnel", "__version__", "build_fisher_mask", "resolve_backend", "set_mask_streams", "triton_available"]
