"""Load a causal LM by bundled alias, local path or hub id; quantized dirs reload exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ModelError
from .arch import ArchSpec, arch_for
from .bundled import BUNDLED, bundled_checkpoint


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for
    path: str  # where the weights came from
    arch: ArchSpec
    quant_info: dict | None = None  # quantshift.json of a quantized dir

    @property
    def needs_bos(self) -> bool:
        return self.arch.needs_bos


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but no CUDA device is available")
    return device


def model_path(name: str) -> Path | str:
    """Bundled alias -> converted checkpoint; existing dir -> itself; else a hub id."""
    if name in BUNDLED:
        return bundled_checkpoint(name)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a model directory (no config.json)")
        return p
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path {name!r} does not exist")
    if "/" not in name:
        raise ModelError(f"unknown model {name!r}; bundled: {', '.join(BUNDLED.names())}, or a local path, or a hub id org/name")
    return name


def load_model(name: str, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import is_quantized_dir, load_quantized

    device = resolve_device(device)
    path = model_path(name)
    torch_dtype = resolve_dtype(dtype, device)
    if isinstance(path, Path) and is_quantized_dir(path):
        model, tok, info = load_quantized(path, torch_dtype, device)
        return LoadedModel(model, tok, name, str(path), arch_for(model), info)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    except (ValueError, KeyError) as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    model.eval().to(device)
    return LoadedModel(model, tok, name, str(path), arch_for(model))
