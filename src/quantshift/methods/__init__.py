"""Quantization methods; importing this package registers every built-in method."""

from . import gptq, rtn  # noqa: F401  (registration side effect within the package only)
from . import awq, fp8, kvcache, smoothquant, zeroquant  # noqa: F401  (issue #3 part A)
from . import quip, spqr  # noqa: F401  (SpQR, QuIP)
from .base import METHODS, Method, StageConfig

__all__ = ["METHODS", "Method", "StageConfig"]
