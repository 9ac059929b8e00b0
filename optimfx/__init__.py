"""optimfx: fused PyTorch optimizers with a plain-PyTorch reference and Triton kernels."""

from ._source_tree import register_kernels as _register_kernels

_register_kernels()

from ._dispatch import resolve_backend, triton_available  # noqa: E402
from ._version import __version__  # noqa: E402
from .fisher import build_fisher_mask  # noqa: E402
from .optim import AdaFactor, AdamW, AdaX, AdaXW, ChildTuning, ChildTuningAdamW, EGStepSize, Funnel  # noqa: E402
from .optim.mask_streams import set_mask_streams  # noqa: E402

__all__ = ["AdaFactor", "AdamW", "AdaX", "AdaXW", "ChildTuning", "ChildTuningAdamW", "EGStepSize", "Funnel", "__version__", "build_fisher_mask", "resolve_backend", "set_mask_streams", "triton_available"]
