"""Quantized model directories: what a quantization run writes and `eval`/`export` reload.

    DIR/config.json, tokenizer files      the base model's config and tokenizer
    DIR/model.safetensors                 every tensor except the quantized linear weights
    DIR/quantized.safetensors             per quantized linear: codes (uint8), scales, zeros, g_idx
    DIR/quantshift.json                   recipe, calibration manifest, per-module formats,
                                          input quantizers, versions, sha256 of the files
    DIR/report.json                       per-layer and per-block errors and timings

Weights are rebuilt as scale * (codes - zero), the same expression the solvers used, so a
reload reproduces the in-memory fake-quant model exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ModelError
from .quant.actquant import attach_input_quantizers, attach_output_quantizers
from .quant.primitives import QuantizedWeight, QuantSpec

QUANT_FILE = "quantshift.json"
REPORT_FILE = "report.json"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"quantshift": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def staged_directory(out: Path, overwrite: bool, error: type[Exception] = ModelError) -> Iterator[Path]:
    """A temp dir beside `out`, renamed into place when the block succeeds, so a crash never
    leaves a half-written `out`; refuses a non-empty `out` unless `overwrite`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise error(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_quantized(model: nn.Module, tokenizer: Any, out: Path, *, base_model: str, recipe: dict,
                   calibration: dict | None, modules: dict, report: dict, overwrite: bool = False) -> Path:
    """Write a quantized model directory atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    out = Path(out)
    with staged_directory(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)  # type: ignore[union-attr,operator]  # a transformers PretrainedConfig
        tokenizer.save_pretrained(tmp)
        qtensors: dict[str, torch.Tensor] = {}
        quantized_weights = set()
        module_table: dict[str, Any] = {}
        act_table: dict[str, Any] = {}
        out_table: dict[str, Any] = {}
        for name, m in modules.items():
            entry: dict[str, Any] = {"stage": m.stage, "info": m.info}
            qw: QuantizedWeight | None = m.qweight
            if qw is not None:
                entry["weight"] = qw.spec.model_dump()
                qtensors[f"{name}.codes"] = qw.codes.contiguous().cpu()
                qtensors[f"{name}.scales"] = qw.scale.float().contiguous().cpu()
                qtensors[f"{name}.zeros"] = qw.zero.float().contiguous().cpu()
                if qw.g_idx is not None:
                    qtensors[f"{name}.g_idx"] = qw.g_idx.to(torch.int32).contiguous().cpu()
                for extra in ("outlier_idx", "outlier_values"):  # sparse 16-bit outliers (SpQR)
                    if getattr(qw, extra, None) is not None:
                        qtensors[f"{name}.{extra}"] = getattr(qw, extra).contiguous().cpu()
                quantized_weights.add(f"{name}.weight")
            if m.act is not None:
                entry["act"] = m.act
                act_table[name] = m.act
            if getattr(m, "out", None) is not None:
                entry["out"] = m.out
                out_table[name] = m.out
            module_table[name] = entry
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if k not in quantized_weights}
        # tied weights appear twice in a state dict; safetensors refuses shared storage
        seen: dict[int, str] = {}
        for k in list(state):
            ptr = state[k].data_ptr()
            if ptr in seen:
                del state[k]
            else:
                seen[ptr] = k
        save_file(state, str(tmp / "model.safetensors"))
        save_file(qtensors, str(tmp / "quantized.safetensors"))
        info = {
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "recipe": recipe,
            "calibration": calibration,
            "modules": module_table,
            "input_quantizers": act_table,
            "output_quantizers": out_table,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {f: file_sha256(tmp / f) for f in ("model.safetensors", "quantized.safetensors")},
        }
        write_json_atomic(tmp / QUANT_FILE, info)
        write_json_atomic(tmp / REPORT_FILE, report)
    return out


def read_quant_info(path: Path) -> dict:
    try:
        return json.loads((path / QUANT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"corrupt quantized model directory {path}: cannot read {QUANT_FILE} ({err})") from None


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def read_quantized_dir(path: Path, verify: bool = True) -> tuple[dict, Any, Any, dict, dict]:
    """quantshift.json, config, tokenizer, float tensors and quantized tensors of a directory,
    checked against the recorded sha256 digests."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    info = read_quant_info(path)
    for fname, digest in info.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            raise ModelError(f"corrupt quantized model directory {path}: missing {fname}")
        if verify and file_sha256(f) != digest:
            raise ModelError(f"corrupt quantized model directory {path}: {fname} does not match its sha256")
    try:
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        state = load_file(str(path / "model.safetensors"))
        qt = load_file(str(path / "quantized.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelError(f"corrupt quantized model directory {path}: {str(err).splitlines()[0]}") from None
    return info, config, tok, state, qt


def quantized_weights(info: dict, qt: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """Codes and qparams of every quantized linear in a directory (sparse outliers not applied)."""
    out = {}
    for name, entry in info["modules"].items():
        if "weight" not in entry:
            continue
        g_idx = qt.get(f"{name}.g_idx")
        out[name] = QuantizedWeight(qt[f"{name}.codes"], qt[f"{name}.scales"], qt[f"{name}.zeros"],
                                    QuantSpec(**entry["weight"]), g_idx.long() if g_idx is not None else None)
    return out


def dense_weight(name: str, qw: QuantizedWeight, qt: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight a fake-quant model uses: dequantized codes, sparse outliers applied."""
    w = qw.dequantize(torch.float32)
    idx = qt.get(f"{name}.outlier_idx")
    if idx is not None:  # flat indices of weights kept in 16-bit, overriding their codes
        w.view(-1)[idx.long()] = qt[f"{name}.outlier_values"].float()
    return w


def load_quantized(path: Path, dtype: torch.dtype, device: str, verify: bool = True) -> tuple[nn.Module, Any, dict]:
    from transformers import AutoModelForCausalLM

    info, config, tok, state, qt = read_quantized_dir(path, verify)
    for name, qw in quantized_weights(info, qt).items():
        state[f"{name}.weight"] = dense_weight(name, qw, qt)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.startswith("lm_head"))]
    if missing or unexpected:
        raise ModelError(f"corrupt quantized model directory {path}: missing {missing[:3]} unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    model.to(dtype=dtype, device=device).eval()
    attach_input_quantizers(model, info.get("input_quantizers", {}))
    attach_output_quantizers(model, info.get("output_quantizers", {}))
    return model, tok, info
