"""How many bytes a quantized model's weights take when packed: the efficiency axis of a study.

`packed_bytes` counts what a packed export stores (compressed-tensors / GPTQ layout): b-bit
codes packed densely, one float16 scale per group plus a b-bit zero point on asymmetric grids,
fp8 codes as one byte with float32 scales, a method's own count where it measured one (SpQR:
outliers and 3-bit second-level statistics); every other parameter (embeddings, norms,
unquantized linears) at `float_bytes` each; a tied weight is counted once. It is pure: it reads
shapes and formats, never values, so the in-memory fake-quant model and its reloaded directory
give the same number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from .primitives import QuantSpec, num_groups


def quantized_linear_bytes(
    out_f: int, in_f: int, spec: QuantSpec, float_bytes: int = 2, measured_bits: float | None = None
) -> int:
    """Stored bytes of one [out_f, in_f] weight in format `spec`; `measured_bits`: the total a
    method that stores more than codes, scales and zeros counted itself (SpQR's outliers)."""
    if measured_bits is not None:
        return math.ceil(measured_bits / 8)
    if spec.dtype == "fp8":
        return out_f * in_f + 4 * (1 if spec.group_size == 0 else out_f)
    groups = out_f * num_groups(in_f, spec.group_size) if spec.group_size != 0 else 1
    b = (out_f * in_f * spec.bits + 7) // 8 + groups * float_bytes
    if not spec.symmetric:
        b += (groups * spec.bits + 7) // 8
    return b


def specs_from_info(quant_info: Mapping[str, Any] | None) -> dict[str, QuantSpec]:
    """Weight formats by module name from a quantized directory's quantshift.json."""
    modules = (quant_info or {}).get("modules", {})
    return {n: QuantSpec(**e["weight"]) for n, e in modules.items() if "weight" in e}


def specs_from_modules(modules: Mapping[str, Any]) -> dict[str, QuantSpec]:
    """Weight formats by module name from an engine result's modules (quant.engine.QuantizedModule:
    the codes' format, kept after a streaming run has written and dropped the codes)."""
    return {n: m.weight_spec for n, m in modules.items() if m.weight_spec is not None}


def packed_size(
    model: nn.Module,
    specs: Mapping[str, QuantSpec],
    float_bytes: int = 2,
    measured_bits: Mapping[str, float | None] | None = None,
) -> dict[str, int]:
    """{"packed_weight_bytes": all parameters packed, "quantized_linear_bytes": the quantized part}."""
    modules = dict(model.named_modules())
    measured = measured_bits or {}
    quant = 0
    for name, spec in specs.items():  # shapes from the module: packed linears have no .weight
        m = modules[name]
        quant += quantized_linear_bytes(m.out_features, m.in_features, spec, float_bytes, measured.get(name))
    total = quant
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights are stored once
            continue
        seen.add(id(p))
        if not (name.endswith(".weight") and name[: -len(".weight")] in specs):
            total += p.numel() * float_bytes
    return {"packed_weight_bytes": total, "quantized_linear_bytes": quant}


def packed_bytes(
    model: nn.Module,
    specs: Mapping[str, QuantSpec],
    float_bytes: int = 2,
    measured_bits: Mapping[str, float | None] | None = None,
) -> int:
    """Bytes a packed export of `model` stores when the linears named in `specs` have those
    formats (see the module docstring); e.g. a study's metric `packed_bytes`."""
    return packed_size(model, specs, float_bytes, measured_bits)["packed_weight_bytes"]
