"""Efficiency metrics (`quantshift bench`): size, packed bytes, memory, prefill/decode speed."""

from .measure import packed_weight_bytes, prefill_and_decode, run_bench

__all__ = ["packed_weight_bytes", "prefill_and_decode", "run_bench"]
