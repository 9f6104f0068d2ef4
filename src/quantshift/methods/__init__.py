"""Quantization methods; importing this package registers every built-in method."""

from . import gptq, rtn  # noqa: F401  (registration side effect within the package only)
from .base import METHODS, Method, StageConfig

__all__ = ["METHODS", "Method", "StageConfig"]
