"""Quantization methods; importing this package registers every built-in method."""

from . import awq, fp8, gptq, kvcache, quip, rtn, smoothquant, spqr, zeroquant  # noqa: F401  (registration side effect within the package only)  # noqa: F401  (issue #3 part A)  # noqa: F401  (SpQR, QuIP)
from .base import METHODS, Method, StageConfig

__all__ = ["METHODS", "Method", "StageConfig"]
