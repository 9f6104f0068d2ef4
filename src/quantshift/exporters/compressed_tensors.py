"""Export to the compressed-tensors format (what vLLM and transformers load), through the
compressed-tensors library itself: its QuantizationArgs/QuantizationScheme/QuantizationConfig
describe each linear, its compressors (pack-quantized, int-quantized, float-quantized) encode
the weights, and ModelCompressor writes the `quantization_config` into config.json.

Mapping of quantshift's conventions onto the library's:
- quantshift codes are unsigned c in [0, 2^b - 1] with an integer zero z; the library's are
  signed q = c - 2^(b-1) with zero point zp = z - 2^(b-1), so (q - zp) * s = (c - z) * s exactly.
  A symmetric grid (z = 2^(b-1)) has zp = 0 and no zero-point tensor is stored.
- per-tensor integer grids are written as per-channel (the same scale repeated): exact, and the
  form every int kernel accepts.
- act-order with a scattered g_idx is refused: compressed-tensors removed `actorder: group`;
  GPTQ with static groups (or no act-order) has sequential groups and exports fine.
- dynamic per-token activation quantization (W8A8) maps to input_activations
  {strategy: token, dynamic: true}; a calibrated static scale to {strategy: tensor} + input_scale.
  Both use symmetric ranges, as quantshift's activation quantizers do.
The library's compressor quantizes the dequantized weight with our scales and zero points; the
exporter then unpacks the result and checks it equals our codes, so nothing is re-rounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import PER_CHANNEL, PER_TENSOR, grouped
from ..quant.primitives import QuantizedWeight, QuantSpec, expand_to_columns
from .common import (
    ExportError,
    QuantizedCheckpoint,
    check_fused_siblings,
    check_methods,
    dense_tensors,
    export_dtype,
    linear_names_in_blocks,
    write_export,
)

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

# what vLLM's compressed-tensors schemes run (WNA16: 4/8-bit symmetric, 4-bit asymmetric with
# zero points; W8A8: int8 symmetric per-channel/per-tensor weights with int8 activations)
SERVABLE_WEIGHT_ONLY = {(4, True), (8, True), (4, False)}


def _weight_args(spec: QuantSpec, fmt: str) -> QuantizationArgs:
    from compressed_tensors.quantization import QuantizationArgs

    if spec.dtype == "fp8":
        strategy = "tensor" if spec.group_size == PER_TENSOR else "channel"
        if spec.group_size > 0:
            raise ExportError(
                f"cannot export to {fmt}: group-wise fp8 weights (g{spec.group_size}) are not a "
                "compressed-tensors fp8 layout (per-tensor or per-channel)"
            )
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    if spec.group_size > 0:
        return QuantizationArgs(
            num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group", group_size=spec.group_size
        )
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="channel")


def _act_args(act: dict, name: str, fmt: str) -> QuantizationArgs:
    from compressed_tensors.quantization import QuantizationArgs

    spec = QuantSpec(**act["spec"])
    if spec.bits != 8:
        raise ExportError(
            f"cannot export to {fmt}: {name} quantizes its inputs to {spec.bits} bits; engines run "
            "8-bit activations only (int8 or fp8)"
        )
    kind = "float" if spec.dtype == "fp8" else "int"
    if act.get("static_scale") is not None:
        return QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="tensor", dynamic=False)
    if not act.get("per_token", True):
        raise ExportError(
            f"cannot export to {fmt}: {name} uses dynamic per-tensor activation ranges; engines "
            "compute dynamic ranges per token"
        )
    return QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)


def _check_servable(name: str, qw: QuantizedWeight, act: dict | None, fmt: str, allow_unservable: bool) -> None:
    spec = qw.spec
    if qw.g_idx is not None:
        raise ExportError(
            f"cannot export to {fmt}: {name} was quantized with act-order groups (a scattered g_idx), "
            "which compressed-tensors no longer encodes; use --format gptq, or GPTQ with "
            "static_groups: true"
        )
    in_f = qw.codes.shape[1]
    if spec.group_size > 0 and in_f % spec.group_size:
        raise ExportError(
            f"cannot export to {fmt}: {name} has {in_f} input features, not a multiple of group_size "
            f"{spec.group_size} (engines need whole groups)"
        )
    if allow_unservable:
        return
    if spec.dtype == "int" and act is None and (spec.bits, spec.symmetric) not in SERVABLE_WEIGHT_ONLY:
        raise ExportError(
            f"cannot export to {fmt}: {name} is {spec.describe()}; vLLM's compressed-tensors W{spec.bits}A16 "
            "kernels take 4 or 8 bits symmetric, or 4 bits asymmetric (--allow-unservable writes it "
            "anyway for transformers)"
        )
    if act is not None and spec.dtype == "int" and not (spec.bits == 8 and spec.symmetric and spec.group_size <= 0):
        raise ExportError(
            f"cannot export to {fmt}: {name} has {spec.describe()} weights with quantized inputs; vLLM runs "
            "int8 activations only with int8 symmetric per-channel or per-tensor weights (W8A8)"
        )


def _compress_module(
    qw: QuantizedWeight, scheme: QuantizationScheme, dtype: torch.dtype, name: str
) -> dict[str, torch.Tensor]:
    """Our codes -> the library's compressed tensors for one linear, checked to be exact."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    spec = qw.spec
    out_f, in_f = qw.codes.shape
    fmt = infer_module_format(torch.nn.Linear, scheme)
    compressor = BaseCompressor.get_value_from_registry(fmt.value)
    scale = qw.scale.float().expand(out_f, -1) if qw.scale.shape[0] == 1 else qw.scale.float()
    scale = scale.to(dtype)  # the stored scale; the weight below is built from exactly it
    if spec.dtype == "fp8":
        if spec.group_size == PER_TENSOR:
            scale = scale[:1, :1].reshape(1)
        w = qw.codes.float() * (scale.float().reshape(-1, 1) if scale.dim() == 2 else scale.float())
        sd: dict[str, torch.Tensor] = {"weight": w, "weight_scale": scale.float()}
        expected = qw.codes
    else:
        zero = qw.zero.float().expand(out_f, -1) if qw.zero.shape[0] == 1 else qw.zero.float()
        gs = spec.group_size if grouped(spec.group_size) else PER_CHANNEL
        w = expand_to_columns(scale.float(), in_f, gs) * (qw.codes.float() - expand_to_columns(zero, in_f, gs))
        offset = 2 ** (spec.bits - 1)
        sd = {"weight": w, "weight_scale": scale.float()}
        if not spec.symmetric:
            sd["weight_zero_point"] = (zero - offset).to(torch.int8)
        expected = (qw.codes.to(torch.int16) - offset).to(torch.int8)
    out = compressor.compress(sd, scheme)
    if "weight_packed" in out:
        got = unpack_from_int32(out["weight_packed"], spec.bits, torch.Size((out_f, in_f)))
    else:
        got = out["weight"]
    if spec.dtype == "fp8":
        exact = got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    else:
        exact = torch.equal(got, expected)
    if not exact:
        raise ExportError(
            f"internal: compressed-tensors did not reproduce the codes of {name} exactly; refusing to "
            "write an inexact export"
        )
    out["weight_scale"] = out["weight_scale"].to(dtype)
    return out


def export_compressed_tensors(
    ckpt: QuantizedCheckpoint,
    out: Path,
    *,
    dtype: str = "auto",
    fmt: str = "compressed-tensors",
    only_fp8: bool = False,
    allow_unservable: bool = False,
    overwrite: bool = False,
) -> Path:
    import compressed_tensors
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    check_methods(ckpt, fmt)
    act_only = sorted(set(ckpt.acts) - set(ckpt.weights))
    if act_only:
        raise ExportError(
            f"cannot export to {fmt}: {len(act_only)} linears quantize only their inputs (e.g. "
            f"{act_only[0]}); engines have no W16A8 scheme"
        )
    if not ckpt.weights:
        raise ExportError(f"cannot export to {fmt}: no linear has quantized weights (nothing to compress)")
    if only_fp8:
        non_fp8 = [n for n, q in ckpt.weights.items() if q.spec.dtype != "fp8"]
        if non_fp8:
            raise ExportError(
                f"--format fp8 needs fp8 weights; {non_fp8[0]} is {ckpt.weights[non_fp8[0]].spec.describe()} "
                "(use --format compressed-tensors for integer grids)"
            )
    tdtype = export_dtype(ckpt, dtype)

    schemes: dict[str, tuple[Any, Any]] = {}  # key -> (weight args, act args)
    members: dict[str, list[str]] = {}
    scheme_of: dict[str, str] = {}
    for name, qw in sorted(ckpt.weights.items()):
        act = ckpt.acts.get(name)
        aa = _act_args(act, name, fmt) if act is not None else None
        _check_servable(name, qw, act, fmt, allow_unservable)
        wa = _weight_args(qw.spec, fmt)
        key = wa.model_dump_json() + "|" + (aa.model_dump_json() if aa is not None else "")
        schemes.setdefault(key, (wa, aa))
        members.setdefault(key, []).append(name)
        scheme_of[name] = key
    linears = set(linear_names_in_blocks(ckpt)) | {"lm_head"}
    ignore = sorted(n for n in linears if n not in ckpt.weights)
    check_fused_siblings({n: None for n in linears}, lambda n: scheme_of.get(n, "float"), fmt)

    config_groups = {}
    largest = max(members, key=lambda k: len(members[k]))
    by_scheme: dict[str, Any] = {}
    for i, (key, (wa, aa)) in enumerate(sorted(schemes.items(), key=lambda kv: kv[0] != largest)):
        # the largest group targets the Linear class (ignore lists the float ones); others name modules
        targets = ["Linear"] if key == largest else sorted(members[key])
        scheme = QuantizationScheme(targets=targets, weights=wa, input_activations=aa)
        scheme.format = infer_module_format(torch.nn.Linear, scheme)
        config_groups[f"group_{i}"] = scheme
        by_scheme[key] = scheme

    dense = set(ckpt.dense_names())
    both = [n for n in ckpt.weights if f"{n}.weight" in dense]
    if both:
        raise ExportError(f"internal: {both[0]}.weight is both dense and quantized in {ckpt.path}")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from dense_tensors(ckpt, tdtype)
        for name in ckpt.weights:  # one linear read, compressed and written at a time
            comp = _compress_module(ckpt.read_weight(name), by_scheme[scheme_of[name]], tdtype, name)
            act = ckpt.acts.get(name)
            if act is not None and act.get("static_scale") is not None:
                comp["input_scale"] = torch.tensor([float(act["static_scale"])], dtype=torch.float32)
            for k, v in comp.items():
                yield f"{name}.{k}", v

    qconfig = QuantizationConfig(
        config_groups=config_groups,
        ignore=ignore,
        quantization_status=QuantizationStatus.COMPRESSED,
        format=_summary_format(by_scheme),
    )
    compressor = ModelCompressor(quantization_config=qconfig)
    summary = {
        "format": fmt,
        "dtype": str(tdtype).replace("torch.", ""),
        "compressed_tensors": compressed_tensors.__version__,
        "quantized_linears": len(ckpt.weights),
        "float_linears": ignore,
        "transform_only_modules": ckpt.transform_only,
        "schemes": {f"group_{i}": len(members[k]) for i, k in enumerate(sorted(schemes, key=lambda k: k != largest))},
    }
    return write_export(
        out,
        ckpt,
        tensors(),
        None,
        {},
        summary,
        overwrite=overwrite,
        config_writer=lambda d: compressor.update_config(str(d)),
    )


def _summary_format(by_scheme: dict[str, Any]) -> str:
    from compressed_tensors.compressors.format import infer_module_format

    formats = {infer_module_format(torch.nn.Linear, s).value for s in by_scheme.values()}
    return formats.pop() if len(formats) == 1 else "mixed-precision"
