"""Load a causal LM by bundled alias, local path or hub id; quantized dirs reload exactly."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..config import user_path
from ..errors import ModelError
from .arch import ArchSpec, arch_for
from .bundled import BUNDLED, bundled_checkpoint
from .precision import Precision, resolve_precision

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .lazy import WeightSource


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    path: str  # where the weights came from
    arch: ArchSpec
    quant_info: dict | None = None  # quantshift.json of a quantized dir
    precision: Precision = Precision(torch.float32)
    packing: Any = None  # quant.inference.PackReport when loaded with backend "packed"
    # weights on disk (models.lazy): `model` is a skeleton on meta, filled a block at a time on
    # `device` by the streaming quantizer and evaluation; None: the model is in memory
    source: WeightSource | None = None
    device: torch.device = torch.device("cpu")
    # the dtype the checkpoint stored a tensor in (a quantized directory keeps it where lossless)
    stored_dtype: Callable[[str], torch.dtype | None] | None = None
    memory: Any = None  # the memory.MemoryPlan it was loaded under, when one was made
    dispatched: Any = None  # models.dispatch.Dispatch once accelerate's offload hooks are attached
    scratch: Path | None = None  # a directory written only to hold this model on disk (removed after use)

    def compute(self, device: torch.device | str | None = None) -> AbstractContextManager:
        """Context for forward passes in this model's compute precision (bf16 autocast on CPUs
        with bf16 matrix units under --dtype auto)."""
        if device is None:
            p = next(self.model.parameters(), None)
            device = self.device if p is None or p.is_meta else p.device
        return self.precision.context(device)

    @property
    def streamed(self) -> bool:
        return self.source is not None

    @property
    def needs_bos(self) -> bool:
        return self.arch.needs_bos

    @classmethod
    def from_hf(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str | None = None,
        precision: Precision | None = None,
    ) -> LoadedModel:
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
    p = user_path(name)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a model directory (no config.json)")
        return p
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path {name!r} does not exist")
    if "/" not in name:
        raise ModelError(
            f"unknown model {name!r}; bundled: {', '.join(BUNDLED.names())}, or a local path, or a hub id org/name"
        )
    return name


BACKENDS = ("fake", "packed")


def load_model(
    name: str,
    device: str = "cpu",
    dtype: str = "auto",
    compute_device: str | None = None,
    backend: str = "fake",
    head: str = "float",
    stream: bool = False,
) -> LoadedModel:
    """`compute_device`: where forwards will run when that is not where the weights load (the
    quantizer loads on the CPU and moves one block at a time); it decides what "auto" means.
    `backend` of a quantized directory: "fake" (dequantized float weights, the research model)
    or "packed" (quant.inference: low-bit kernels, weights never in float); `head`
    "int8" also runs the output projection in int8 (packed only, see quant.inference).
    `stream`: leave the weights on disk (models.lazy): the model is a skeleton that the
    streaming quantizer and evaluation fill a block at a time on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import is_quantized_dir

    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if head != "float" and backend != "packed":
        raise ModelError(f"head {head!r} needs backend 'packed'")
    if head != "float" and stream:
        raise ModelError(f"head {head!r} needs the model in memory; it cannot stream")
    device = resolve_device(device)
    path = model_path(name)
    precision = resolve_precision(dtype, resolve_device(compute_device) if compute_device else device)
    quantized = isinstance(path, Path) and is_quantized_dir(path)
    if backend == "packed":
        if not quantized:
            raise ModelError(f"--backend packed needs a quantized directory; {name!r} is not one")
        # packed linears compute in their own types: no autocast around them
        precision = Precision(torch.bfloat16 if precision.autocast is not None else precision.weights)
    if quantized:
        return _load_quantized(name, Path(path), device, precision, backend, head, stream)
    if stream:
        return _skeleton(name, local_checkpoint(path), device, precision)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=precision.weights)
    except OSError as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    except (ValueError, KeyError) as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    model.eval().to(device)
    stored = _stored_dtypes(path)
    return LoadedModel(
        model,
        tok,
        name,
        str(path),
        arch_for(model),
        precision=precision,
        device=torch.device(device),
        stored_dtype=stored.get if stored else None,
    )


def local_checkpoint(path: Path | str) -> Path:
    """A checkpoint's local directory: itself, or a hub id's snapshot (downloaded if needed)."""
    if isinstance(path, Path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
            )
        )
    except Exception as err:  # network, authentication, unknown repo: one line for the user
        raise ModelError(f"cannot fetch model {path!r}: {str(err).splitlines()[0]}") from None


def _stored_dtypes(path: Path | str) -> dict[str, torch.dtype] | None:
    """Stored dtypes of a local checkpoint's tensors (headers only); None for a hub id."""
    from .lazy import checkpoint_dtypes

    if not isinstance(path, Path):
        return None
    try:
        return checkpoint_dtypes(path)
    except ModelError:  # not safetensors: the quantized directory stores what it computed
        return None


def _skeleton(name: str, path: Path, device: str, precision: Precision) -> LoadedModel:
    """An unquantized checkpoint left on disk: skeleton on meta + its weight source."""
    from transformers import AutoConfig, AutoTokenizer

    from .lazy import CheckpointSource, empty_model

    try:
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    model = empty_model(config, precision.weights)
    source = CheckpointSource(path, model)
    return LoadedModel(
        model,
        tok,
        name,
        str(path),
        arch_for(model),
        precision=precision,
        source=source,
        device=torch.device(device),
        stored_dtype=source.stored_dtype,
    )


def _load_quantized(
    name: str, path: Path, device: str, precision: Precision, backend: str, head: str, stream: bool
) -> LoadedModel:
    from ..checkpoint import QuantizedDir
    from ..quant.actquant import attach_input_quantizers, attach_output_quantizers
    from ..quant.inference import (
        PackedSource,
        PackReport,
        attach_packed_quantizers,
        packed_skeleton,
        quantize_head,
    )
    from .lazy import FakeQuantSource, empty_model, materialize_all

    dev = torch.device(device)
    qdir = QuantizedDir(path)
    report = None
    source: WeightSource
    if backend == "packed":
        model, choices = packed_skeleton(qdir, precision.weights, dev)
        source = PackedSource(qdir, model, choices, precision.weights, dev)
    else:
        model = empty_model(qdir.config(), precision.weights)
        source = FakeQuantSource(qdir, model)
    if not stream:
        materialize_all(model, source, dev)
    if backend == "packed":
        if head == "int8":
            head_name, choices[head_name] = quantize_head(model, dev)
        attach_packed_quantizers(model, qdir, choices)
        report = PackReport(choices)
    else:
        attach_input_quantizers(model, qdir.acts)
        attach_output_quantizers(model, qdir.info.get("output_quantizers", {}))
    return LoadedModel(
        model,
        qdir.tokenizer(),
        name,
        str(path),
        arch_for(model),
        qdir.info,
        precision,
        report,
        source=source if stream else None,
        device=dev,
        stored_dtype=source.stored_dtype,
    )
