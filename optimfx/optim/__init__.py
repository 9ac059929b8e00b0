"""``torch.optim.Optimizer`` subclasses: validation, state layout and docs; maths lives in reference/."""

from .adafactor import AdaFactor
from .adamw import AdamW, ChildTuningAdamW
from .adax import AdaX, AdaXW
from .base import FxOptimizer
from .eg import EGStepSize, Funnel

__all__ = ["AdaFactor", "AdamW", "ChildTuningAdamW", "AdaX", "AdaXW", "EGStepSize", "Funnel", "FxOptimizer"]
