"""What every exporter shares: reading a quantized directory, deciding what may be exported,
and writing the output directory atomically.

An export never re-quantizes: it re-encodes the integer codes, scales and zero points that the
quantizer chose (read a linear at a time from the quantized directory's shards) in another
engine's layout, and writes the result a shard at a time. Whatever cannot be encoded
exactly is refused with a one-line ExportError instead of writing a file that looks valid.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import DEFAULT_SHARD_BYTES, QUANT_FILE, QuantizedDir, staged_directory
from ..errors import QuantshiftError
from ..models.shards import INDEX_FILE, ShardWriter
from ..quant.primitives import QuantizedWeight

EXPORT_INFO = "quantshift_export.json"


class ExportError(QuantshiftError):
    """The quantized model cannot be written in the requested format (explained in one line)."""


# Stages whose result is fully described by per-linear codes/scales/zeros (plus ordinary float
# weights for transforms folded into neighbouring layers). Methods may also opt in or out by
# setting a class attribute `exportable = True` or `export_blocker = "reason"`.
PLAIN_GRID_STAGES = {"rtn", "gptq", "awq", "smoothquant", "zeroquant", "fp8"}
KNOWN_BLOCKERS = {
    "spqr": "SpQR keeps fp16 outliers (CSR) and 3-bit quantized group statistics that no serving engine format holds",
    "quip": "QuIP's incoherence rotations must be applied to activations at run time, which no "
    "export format here encodes",
    "kvcache": "KV-cache quantization is a run-time setting of the engine (e.g. vLLM --kv-cache-dtype fp8), "
    "not part of these weight formats",
}

# vLLM fuses these sibling projections into one matrix: they must share one format
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


class MetaWeights(Mapping):
    """Linear name -> its codes and qparams as meta tensors (format, shapes, act-order g_idx):
    what the exporters' checks need, without reading any codes."""

    def __init__(self, qdir: QuantizedDir) -> None:
        self.qdir = qdir

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name not in self.qdir.specs:
            raise KeyError(name)
        return self.qdir.meta_weight(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.qdir.specs)

    def __len__(self) -> int:
        return len(self.qdir.specs)


@dataclass
class QuantizedCheckpoint:
    """A quantized model directory read without instantiating the model: headers and records up
    front, tensors one at a time (an export streams a model of any size through one shard)."""

    path: Path
    info: dict
    config: dict  # config.json
    qdir: QuantizedDir
    weights: MetaWeights  # linear name -> codes and qparams on meta (read_weight reads them)
    acts: dict[str, dict]  # linear name -> input quantizer dict (spec, per_token, static_scale)
    transform_only: list[str] = field(default_factory=list)  # recorded modules without codes or act

    @property
    def stages(self) -> list[str]:
        return [next(iter(s)) for s in self.info.get("recipe", {}).get("stages", [])]

    def read_weight(self, name: str) -> QuantizedWeight:
        return self.qdir.quantized_weight(name)

    def dense_names(self) -> list[str]:
        """Every stored tensor that is not part of a quantized linear (embeddings, norms, ...)."""
        return self.qdir.float_names()

    def dense_shape(self, name: str) -> tuple[int, ...]:
        return self.qdir.tensors.info(name).shape


def read_checkpoint(path: str | Path, verify: bool = True) -> QuantizedCheckpoint:
    from ..checkpoint import QuantizedDir
    from ..errors import ModelError

    path = Path(path)
    if not (path / QUANT_FILE).is_file():
        raise ExportError(f"{path} is not a quantshift quantized directory (no {QUANT_FILE}); quantize it first")
    try:
        qdir = QuantizedDir(path, verify)
    except ModelError as err:
        raise ExportError(str(err)) from None
    info = qdir.info
    config = json.loads((path / "config.json").read_text())
    acts: dict[str, dict] = {}
    transform_only: list[str] = []
    for name, entry in info["modules"].items():
        if "act" in entry:
            acts[name] = entry["act"]
        if "weight" not in entry and "act" not in entry and "out" not in entry:
            transform_only.append(name)
    return QuantizedCheckpoint(path, info, config, qdir, MetaWeights(qdir), acts, transform_only)


def check_methods(ckpt: QuantizedCheckpoint, fmt: str) -> None:
    """Refuse recipes whose result is more than a plain grid of codes per linear."""
    from ..methods import METHODS

    for stage in ckpt.stages:
        cls = METHODS.get(stage) if stage in METHODS.names() else None
        blocker = getattr(cls, "export_blocker", None) or KNOWN_BLOCKERS.get(stage)
        if blocker:
            raise ExportError(f"cannot export method {stage!r} to {fmt}: {blocker}")
        if stage not in PLAIN_GRID_STAGES and not getattr(cls, "exportable", False):
            raise ExportError(
                f"cannot export method {stage!r} to {fmt}: export does not know that its result is a "
                "plain per-linear grid (a method declares this with `exportable = True`)"
            )
    if ckpt.info.get("output_quantizers"):
        raise ExportError(
            f"cannot export to {fmt}: the recipe fake-quantizes module outputs "
            f"({len(ckpt.info['output_quantizers'])} modules, e.g. the KV cache); serve with the engine's "
            "own KV-cache setting (vLLM --kv-cache-dtype fp8) on a weights-only export instead"
        )


def check_fused_siblings(names: dict[str, Any], describe: Callable[[str], str], fmt: str) -> None:
    """vLLM loads q/k/v and gate/up as one fused matrix: their formats must agree."""
    for group in FUSED_SIBLINGS:
        for name in names:
            leaf = name.rsplit(".", 1)[-1]
            if leaf != group[0]:
                continue
            prefix = name[: -len(leaf)]
            kinds = {describe(prefix + s) for s in group}
            if len(kinds) > 1:
                raise ExportError(
                    f"cannot export to {fmt}: {prefix}{{{','.join(group)}}} are fused by vLLM and must "
                    f"share one format, got {sorted(kinds)}"
                )


def export_dtype(ckpt: QuantizedCheckpoint, dtype: str) -> torch.dtype:
    """auto: bfloat16 when the base model was bfloat16, else float16 (what the int4 kernels take)."""
    if dtype == "auto":
        base = str(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "")
        return torch.bfloat16 if "bfloat16" in base else torch.float16
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dense_tensors(ckpt: QuantizedCheckpoint, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every float tensor of the checkpoint, read one at a time, floating point cast to `dtype`."""
    for name in ckpt.dense_names():
        v = ckpt.qdir.tensors.get(name)
        yield name, (v.to(dtype) if v.is_floating_point() else v).contiguous()


def linear_names_in_blocks(ckpt: QuantizedCheckpoint) -> list[str]:
    """Every 2-D `<name>.weight` among the float tensors or quantized: candidate linears."""
    names = {
        k[: -len(".weight")] for k in ckpt.dense_names() if k.endswith(".weight") and len(ckpt.dense_shape(k)) == 2
    }
    names |= set(ckpt.weights)
    return sorted(n for n in names if "embed" not in n)


def write_export(
    out: Path,
    ckpt: QuantizedCheckpoint,
    tensors: Iterable[tuple[str, torch.Tensor]],
    quantization_config: dict | None,
    extra_files: dict[str, Any],
    summary: dict,
    overwrite: bool = False,
    config_writer: Callable[[Path], None] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write config + tokenizer + sharded safetensors (with an index, the Hugging Face layout)
    into a temp dir, a tensor at a time, then rename it into place."""
    out = Path(out)
    with staged_directory(out, overwrite, ExportError) as tmp:
        for f in ckpt.path.iterdir():  # tokenizer and generation files travel unchanged
            if (
                f.is_file()
                and f.suffix != ".safetensors"
                and f.name not in {INDEX_FILE, QUANT_FILE, "report.json", "config.json"}
            ):
                shutil.copy2(f, tmp / f.name)
        config = dict(ckpt.config)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        if "dtype" in summary:  # transformers 5 writes `dtype`, older readers (and vLLM) `torch_dtype`
            config["torch_dtype"] = summary["dtype"]
            if "dtype" in config:
                config["dtype"] = summary["dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if config_writer is not None:
            config_writer(tmp)
        writer = ShardWriter(tmp, max_shard_bytes)
        writer.add_all(tensors)
        digests = writer.close()
        for fname, data in extra_files.items():
            (tmp / fname).write_text(json.dumps(data, indent=2, sort_keys=True))
        summary = {
            **summary,
            "source": str(ckpt.path),
            "recipe": ckpt.info.get("recipe"),
            "calibration": ckpt.info.get("calibration"),
            "base_model": ckpt.info.get("base_model"),
            "files": digests,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return out
