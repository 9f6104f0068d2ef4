"""Load a causal LM by bundled alias, local path or hub id; quantized dirs reload exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ModelError
from .arch import ArchSpec, arch_for
from .bundled import BUNDLED, bundled_checkpoint
from .precision import Precision, resolve_precision


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for
    path: str  # where the weights came from
    arch: ArchSpec
    quant_info: dict | None = None  # quantshift.json of a quantized dir
    precision: Precision = Precision(torch.float32)
    packing: Any = None  # quant.inference.PackReport when loaded with backend "packed"

    def compute(self, device: torch.device | str | None = None):
        """Context for forward passes in this model's compute precision (bf16 autocast on CPUs
        with bf16 matrix units under --dtype auto)."""
        return self.precision.context(device or next(self.model.parameters()).device)

    @property
    def needs_bos(self) -> bool:
        return self.arch.needs_bos

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer: object, *, name: str | None = None,
                precision: Precision | None = None) -> LoadedModel:
        """Wrap a Hugging Face causal LM held in memory: the engine then works on this very object.
        `precision` defaults to the dtype the model's weights are in, without autocast."""
        try:
            arch = arch_for(model)
        except ValueError as err:
            raise ModelError(str(err)) from None
        config = getattr(model, "config", None)
        label = name or getattr(config, "_name_or_path", "") or type(model).__name__
        weights = next(model.parameters()).dtype
        return cls(model, tokenizer, label, "memory", arch, precision=precision or Precision(weights))


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


BACKENDS = ("fake", "packed")


def load_model(name: str, device: str = "cpu", dtype: str = "auto", compute_device: str | None = None,
               backend: str = "fake", head: str = "float") -> LoadedModel:
    """`compute_device`: where forwards will run when that is not where the weights load (the
    quantizer loads on the CPU and moves one block at a time); it decides what "auto" means.
    `backend` of a quantized directory: "fake" (dequantized float weights, the research model)
    or "packed" (quant.inference.load_packed: low-bit kernels, weights never in float); `head`
    "int8" also runs the output projection in int8 (packed only, see quant.inference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import is_quantized_dir, load_quantized

    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if head != "float" and backend != "packed":
        raise ModelError(f"head {head!r} needs backend 'packed'")
    device = resolve_device(device)
    path = model_path(name)
    precision = resolve_precision(dtype, resolve_device(compute_device) if compute_device else device)
    torch_dtype = precision.weights
    quantized = isinstance(path, Path) and is_quantized_dir(path)
    if backend == "packed":
        if not quantized:
            raise ModelError(f"--backend packed needs a quantized directory; {name!r} is not one")
        from ..quant.inference import load_packed

        # packed linears compute in their own types: no autocast around them
        precision = Precision(torch.bfloat16 if precision.autocast is not None else precision.weights)
        model, tok, info, report = load_packed(Path(path), precision.weights, device, head=head)
        return LoadedModel(model, tok, name, str(path), arch_for(model), info, precision, report)
    if quantized:
        model, tok, info = load_quantized(Path(path), torch_dtype, device)
        return LoadedModel(model, tok, name, str(path), arch_for(model), info, precision)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    except (ValueError, KeyError) as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    model.eval().to(device)
    return LoadedModel(model, tok, name, str(path), arch_for(model), precision=precision)
