"""``torch.optim.Optimizer`` subclasses: validation, state layout and docs; maths lives in reference/."""

from .adafactor import AdaFactor
from .adamw import AdamW, ChildTuningAdamW
from .adax import AdaX, AdaXW
from .base import FxOptimizer
from .child_tuning import ChildTuning
from .eg import EGStepSize, Funnel

__all__ = ["AdaFactor", "AdamW", "ChildTuning", "ChildTuningAdamW", "AdaX", "AdaXW", "EGStepSize", "Funnel", "FxOptimizer"]
