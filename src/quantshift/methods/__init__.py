"""Quantization methods; importing this package registers every built-in method."""

from . import awq, fp8, gptq, kvcache, quip, rtn, smoothquant, spqr, zeroquant  # noqa: F401  (each registers itself)
from .base import METHODS, Method, StageConfig

__all__ = ["METHODS", "Method", "StageConfig"]
