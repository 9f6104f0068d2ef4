"""FP8 (E4M3) export in the compressed-tensors layout, which vLLM loads as W8A16-FP8 (weights
only; the library names the format `naive-quantized`) or W8A8-FP8 (`float-quantized`, with
dynamic per-token or static fp8 activations).

Per linear: `weight` float8_e4m3fn [out, in], `weight_scale` [out, 1] (per channel) or [1]
(per tensor), dequantized as weight * weight_scale; an optional `input_scale` for static
activation scales. The codes are the E4M3 values quantshift's fp8 quantizer chose, written
unchanged (the exporter checks the library reproduces them bit for bit).

vLLM's other fp8 layout (`quant_method: fp8`, per-tensor `weight_scale` or 128x128 blocks
with `weight_scale_inv`) has no per-channel form, so compressed-tensors is the one written.
"""

from __future__ import annotations

from pathlib import Path

from .common import QuantizedCheckpoint
from .compressed_tensors import export_compressed_tensors


def export_fp8(ckpt: QuantizedCheckpoint, out: Path, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    return export_compressed_tensors(ckpt, out, dtype=dtype, fmt="fp8", only_fp8=True, overwrite=overwrite)
