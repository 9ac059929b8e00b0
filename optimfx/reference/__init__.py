"""Plain-PyTorch reference implementations: the specification every fast path is tested against."""

from . import adax, common

__all__ = ["adax", "common"]
