"""Export to the GPTQ checkpoint layout (AutoGPTQ / GPTQModel / vLLM `quantization: gptq`).

Per quantized linear (in = input features, out = output features, b bits, p = 32 / b):
    qweight  int32 [in / p, out]   codes packed along the *input* dim, low bits first
    qzeros   int32 [groups, out / p] zero points packed along the *output* dim, low bits first
    scales   float16 [groups, out]
    g_idx    int32 [in]            group of each input column (act-order: scattered)
    bias     (unchanged, if the linear has one)
dequantized as W[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o]).

Zero points and checkpoint_format:
- "gptq" (v1, the historical layout that AutoGPTQ wrote and every loader reads) stores
  zero - 1 and loaders add 1 back (`zeros = qzeros_unpacked + 1`). A zero point of 0 (a group
  whose values are all >= 0 on an asymmetric grid) therefore cannot be written exactly in v1:
  the stored -1 wraps to 2^b - 1 and decodes to 2^b. Such checkpoints are refused in v1.
- "gptq_v2" (GPTQModel's internal layout; vLLM reads it via `checkpoint_format: gptq_v2`)
  stores the zero point itself.
- symmetric grids have zero = 2^(b-1) (stored 0x77777777 for 4 bits in v1), matching the
  uint4b8 type vLLM's Marlin kernels assume.
desc_act = True is written when a g_idx is scattered (act-order without static groups);
otherwise g_idx = i // group_size and desc_act = False, so Marlin needs no column permutation.
Only 2, 4 and 8 bits (widths that divide 32) are written: 3-bit GPTQ packs codes across word
boundaries in a layout whose loaders disagree, and is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import PER_CHANNEL, grouped
from ..quant.primitives import QuantizedWeight, pack_codes
from .common import (
    ExportError,
    QuantizedCheckpoint,
    check_methods,
    dense_tensors,
    export_dtype,
    linear_names_in_blocks,
    write_export,
)


def gptq_tensors(qw: QuantizedWeight, version: int, name: str) -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales/g_idx of one linear (scales in float32; the caller casts)."""
    spec = qw.spec
    out_f, in_f = qw.codes.shape
    if spec.group_size > 0:
        g_idx = qw.g_idx if qw.g_idx is not None else torch.arange(in_f) // spec.group_size
        scale, zero = qw.scale.float(), qw.zero.float()
    else:  # per-channel or per-tensor: one group spanning all columns
        g_idx = torch.zeros(in_f, dtype=torch.long)
        scale = qw.scale.float().expand(out_f, 1)
        zero = qw.zero.float().expand(out_f, 1)
    zeros = zero.round().to(torch.int64)
    if version == 1:
        if (zeros == 0).any():
            raise ExportError(
                f"cannot export {name} as GPTQ v1: it has zero points equal to 0, which v1's "
                "'stored zero + 1' convention cannot represent; use --gptq-version 2 (vLLM and "
                "GPTQModel read checkpoint_format gptq_v2) or a symmetric grid"
            )
        zeros = zeros - 1
    qweight = pack_codes(qw.codes.t().contiguous(), spec.bits, dim=0)  # [in/p, out]
    qzeros = pack_codes(zeros.t().contiguous() & spec.maxq, spec.bits, dim=1)  # [groups, out/p]
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scale.t().contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def export_gptq(
    ckpt: QuantizedCheckpoint, out: Path, *, dtype: str = "auto", version: int = 1, overwrite: bool = False
) -> Path:
    fmt = "gptq"
    check_methods(ckpt, fmt)
    if version not in (1, 2):
        raise ExportError(f"--gptq-version must be 1 or 2, got {version}")
    if not ckpt.weights:
        raise ExportError("cannot export to gptq: no linear has quantized weights")
    if ckpt.acts:
        raise ExportError(
            f"cannot export to gptq: the recipe quantizes the inputs of {len(ckpt.acts)} linears; GPTQ "
            "checkpoints are weight-only (W{b}A16); use --format compressed-tensors for W8A8"
        )
    specs = {
        (q.spec.bits, q.spec.group_size if grouped(q.spec.group_size) else PER_CHANNEL, q.spec.symmetric, q.spec.dtype)
        for q in ckpt.weights.values()
    }
    if len(specs) > 1:
        raise ExportError(
            f"cannot export to gptq: linears use {len(specs)} different formats {sorted(specs)}; the GPTQ "
            "config has one bits/group_size/sym for the model (use --format compressed-tensors)"
        )
    bits, group_size, sym, kind = specs.pop()
    if kind != "int":
        raise ExportError("cannot export fp8 weights to gptq (integer grids only); use --format fp8")
    if 32 % bits:
        raise ExportError(
            f"cannot export {bits}-bit weights to gptq: only 2, 4 and 8 bits pack into int32 words "
            "without straddling (3-bit GPTQ packing is not written)"
        )
    for name, qw in ckpt.weights.items():
        out_f, in_f = qw.codes.shape
        if group_size > 0 and in_f % group_size:
            raise ExportError(
                f"cannot export to gptq: {name} has {in_f} input features, not a multiple of group_size {group_size}"
            )
        if in_f % (32 // bits) or out_f % (32 // bits):
            raise ExportError(
                f"cannot export to gptq: {name} is {out_f}x{in_f}; both dims must be multiples of "
                f"{32 // bits} to pack {bits}-bit codes into int32"
            )
    desc_act = any(q.g_idx is not None for q in ckpt.weights.values())

    tdtype = export_dtype(ckpt, dtype)
    if tdtype == torch.float32:
        raise ExportError("GPTQ checkpoints store float16 scales; choose --dtype float16 or bfloat16")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from dense_tensors(ckpt, tdtype)
        for name in ckpt.weights:  # one linear read, packed and written at a time
            for k, v in gptq_tensors(ckpt.read_weight(name), version, name).items():
                yield f"{name}.{k}", v.to(torch.float16) if k == "scales" else v

    # linears inside blocks that were not quantized: GPTQModel/vLLM's `dynamic` negative rules
    skipped = [n for n in linear_names_in_blocks(ckpt) if n not in ckpt.weights and ".layers." in n]
    dynamic: dict[str, dict] = {f"-:^{n.replace('.', '[.]')}$": {} for n in skipped}
    checkpoint_format = "gptq" if version == 1 else "gptq_v2"
    qcfg = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
        "lm_head": False,
        "true_sequential": True,
        "static_groups": False,
        "damp_percent": _damp(ckpt),
        "pack_dtype": "int32",
    }
    if dynamic:
        qcfg["dynamic"] = dynamic
    quantize_config = {k: v for k, v in qcfg.items() if k != "quant_method"}
    quantize_config.update(
        quant_method="gptq", model_file_base_name="model", model_name_or_path=None, meta={"quantizer": ["quantshift"]}
    )
    summary = {
        "format": fmt,
        "checkpoint_format": checkpoint_format,
        "dtype": str(tdtype).replace("torch.", ""),
        "quantized_linears": len(ckpt.weights),
        "float_linears_in_blocks": skipped,
        "transform_only_modules": ckpt.transform_only,
        "desc_act": desc_act,
    }
    return write_export(
        out, ckpt, tensors(), qcfg, {"quantize_config.json": quantize_config}, summary, overwrite=overwrite
    )


def _damp(ckpt: QuantizedCheckpoint) -> float:
    for stage in ckpt.info.get("recipe", {}).get("stages", []):
        if "gptq" in stage:
            return float(stage["gptq"].get("damp", 0.01))
    return 0.01
