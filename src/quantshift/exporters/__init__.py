"""Exporters: quantshift's quantized directories -> formats serving engines load.

compressed-tensors   packed int4/int8 (and W8A8) via the compressed-tensors library (vLLM, transformers)
gptq                 qweight/qzeros/scales/g_idx int32-packed (vLLM, GPTQModel, AutoGPTQ)
fp8                  E4M3 weights with per-channel/per-tensor scales (compressed-tensors float-quantized)
"""

from __future__ import annotations

from pathlib import Path

from .common import ExportError, read_checkpoint

FORMATS = ("compressed-tensors", "gptq", "fp8")


def export(
    src: str | Path,
    fmt: str,
    out: str | Path,
    *,
    dtype: str = "auto",
    gptq_version: int = 1,
    allow_unservable: bool = False,
    overwrite: bool = False,
) -> Path:
    """Re-encode a quantized directory `src` in format `fmt` under `out`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    ckpt = read_checkpoint(src)
    if fmt == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(
            ckpt, Path(out), dtype=dtype, allow_unservable=allow_unservable, overwrite=overwrite
        )
    if fmt == "gptq":
        from .gptq_format import export_gptq

        return export_gptq(ckpt, Path(out), dtype=dtype, version=gptq_version, overwrite=overwrite)
    from .fp8 import export_fp8

    return export_fp8(ckpt, Path(out), dtype=dtype, overwrite=overwrite)


__all__ = ["FORMATS", "ExportError", "export", "read_checkpoint"]
