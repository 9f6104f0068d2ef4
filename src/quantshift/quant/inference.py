"""Real low-bit inference: a quantized directory loaded with its linears as packed modules.

`load_packed` builds the model with parameters on the meta device (accelerate's
init_empty_weights), so a quantized linear's float weight is never allocated: each is replaced
by the packed module `choose_linear` picks, and only the float tensors (embeddings, norms,
unquantized linears) are loaded, in `dtype`.

Selection, per quantized linear (explicit and reported, see PackReport); what the device can do
comes from its capability (models.capability), so a choice names the compute capability or CPU
flag it lacks:
- integer weights + an input quantizer, one scale per output channel -> Int8Linear ("w8a8",
  kernel int8-intmm on a CPU with int8 units or a CUDA sm75+ GPU, else int8-emulated with the reason);
- fp8 weights + fp8 inputs, per channel or per tensor -> FP8Linear ("w8a8", kernel fp8-scaled-mm,
  torch._scaled_mm on CUDA sm89+); elsewhere the exact fake-quant below, with the reason;
- integer weights of 2/4/8 bits, float inputs -> PackedLinear ("w{b}a16", kernel int4mm-cpu /
  int4mm-cuda (sm80+), or dequant with the reason: other bit widths, partial groups, act-order,
  widths, an older GPU);
- anything else (fp8 elsewhere, SpQR outliers, 3/5/6/7 bits, grouped W8A8) -> a float nn.Linear of
  the dequantized weight ("float", with the reason), plus the fake input quantizer if it has one,
  i.e. exactly the fake-quant module.

`head="int8"` also quantizes the output projection (lm_head, which no method quantizes) to int8
per output channel with int8 per-token inputs (Int8Linear): the format llama.cpp gives the
output matrix of its 4-bit files (Q8_0 weights; its dot products quantize activations to 8 bits
too). At batch 1 on this CPU the int8 product reads a 49k-vocabulary head ~30x faster than a
bf16 GEMV, which re-lays out the whole weight on every call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models import capability as _cap
from ..models.capability import Capability
from .actquant import attach_input_quantizers, attach_output_quantizers
from .fp8linear import FP8Linear, fp8_choice
from .int8linear import Int8Linear, w8a8_problem
from .primitives import QuantizedWeight, QuantSpec, quantize_weight
from .qlinear import PackedLinear


@dataclass(frozen=True)
class LinearChoice:
    kind: str  # "w8a8", "w4a16" (w{bits}a16), "float"
    kernel: str  # int8-intmm, int8-emulated, fp8-scaled-mm, int4mm-cpu, int4mm-cuda, dequant, float
    reason: str | None = None  # why it is not the fastest path for its kind (None = it is)


@dataclass
class PackReport:
    """Which kernel each quantized linear runs, and why a fallback happened."""

    choices: dict[str, LinearChoice]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices.values():
            key = f"{c.kind}:{c.kernel}"
            out[key] = out.get(key, 0) + 1
        return out

    def fallbacks(self) -> dict[str, list[str]]:
        """reason -> module names."""
        out: dict[str, list[str]] = {}
        for name, c in self.choices.items():
            if c.reason:
                out.setdefault(c.reason, []).append(name)
        return out

    def lines(self) -> list[str]:
        """Human summary: kernel counts, then each fallback reason with how many linears and one example."""
        lines = ["packed linears: " + ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))]
        for reason, names in self.fallbacks().items():
            lines.append(f"fallback ({len(names)} linears, e.g. {names[0]}): {reason}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), "fallbacks": self.fallbacks(),
                "modules": {n: asdict(c) for n, c in self.choices.items()}}


def w8a8_choice(lin: Int8Linear | FP8Linear, device: torch.device | None = None) -> LinearChoice:
    """What an Int8Linear / FP8Linear runs on; the reason names why it is not the GEMM when it is not."""
    return LinearChoice("w8a8", lin.kernel, lin.reason)


def choose_linear(name: str, qw: QuantizedWeight, act: dict | None, bias: torch.Tensor | None,
                  device: torch.device, dtype: torch.dtype, qt: dict[str, torch.Tensor],
                  capability: Capability | None = None) -> tuple[nn.Module, LinearChoice]:
    """The inference module for one quantized linear and what was chosen (see module doc);
    `capability`: the device's (default: detected)."""
    spec = qw.spec
    cap = capability or _cap.detect(device)
    reason: str | None
    if f"{name}.outlier_idx" in qt:
        reason = "sparse 16-bit outliers (SpQR) have no packed kernel"
    elif spec.dtype == "fp8":
        choice = fp8_choice(qw, act, cap)
        reason = choice.reason
        if reason is None and act is not None:
            lin8 = FP8Linear(qw, act, bias, choice.kernel, device)
            return lin8, w8a8_choice(lin8)
    elif spec.dtype != "int":
        reason = f"{spec.describe()} weights have no packed kernel here"
    elif act is not None:
        reason = w8a8_problem(qw, act)
        if reason is None:
            lin = Int8Linear(qw, act, bias, device=device, capability=cap)
            return lin, w8a8_choice(lin)
    elif 32 % spec.bits:
        reason = f"{spec.bits}-bit codes do not pack into int32 words"
    else:
        packed = PackedLinear(qw, bias, "auto", device, dtype, capability=cap)
        return packed, LinearChoice(f"w{spec.bits}a16", packed.backend, packed.fallback_reason)
    from ..checkpoint import dense_weight

    dense = nn.Linear(qw.codes.shape[1], qw.codes.shape[0], bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(dense_weight(name, qw, qt))
        if bias is not None:
            dense.bias.copy_(bias)
    return dense, LinearChoice("float", "float", reason)


HEADS = ("float", "int8")
HEAD_INPUTS = {"spec": {"bits": 8, "group_size": 0, "symmetric": True}, "per_token": True}


def quantize_head(model: nn.Module, device: torch.device) -> tuple[str, LinearChoice]:
    """Replace the output projection by an Int8Linear (per-channel symmetric int8 weights, round to
    nearest; per-token int8 inputs). A tied input embedding stays float for its lookups."""
    get_head: Any = getattr(model, "get_output_embeddings")  # noqa: B009 (typed as a Tensor by nn.Module)
    head = get_head()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output projection is a {type(head).__name__}, not a linear: --head int8 cannot apply")
    name = next(n for n, m in model.named_modules() if m is head)
    qw = quantize_weight(head.weight.detach().float(), QuantSpec(bits=8, group_size=-1, symmetric=True))
    lin = Int8Linear(qw, HEAD_INPUTS, head.bias, device=device)
    set_head: Any = getattr(model, "set_output_embeddings")  # noqa: B009
    set_head(lin)
    return name, w8a8_choice(lin, device)


def load_packed(path: Path, dtype: torch.dtype, device: str, verify: bool = True, head: str = "float"
                ) -> tuple[nn.Module, Any, dict, PackReport]:
    """(model, tokenizer, quantshift.json, report) of a quantized directory with packed linears;
    `head`: "float" (the output projection as stored) or "int8" (see quantize_head)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..checkpoint import quantized_weights, read_quantized_dir
    from ..errors import ModelError

    dev = torch.device(device)
    info, config, tok, state, qt = read_quantized_dir(path, verify)
    acts: dict[str, dict] = info.get("input_quantizers", {})
    with init_empty_weights(include_buffers=False):  # parameters on meta: nothing allocated yet
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules = dict(model.named_modules())
    choices: dict[str, LinearChoice] = {}
    for name, qw in quantized_weights(info, qt).items():
        if not isinstance(modules.get(name), nn.Linear):
            raise ModelError(f"corrupt quantized model directory {path}: {name} is not a linear of this model")
        bias = state.pop(f"{name}.bias", None)
        new, choices[name] = choose_linear(name, qw, acts.get(name), bias, dev, dtype, qt)
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new)
    float_state = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in state.items()}
    _, unexpected = model.load_state_dict(float_state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head.weight = model.get_input_embeddings().weight
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty or unexpected:
        raise ModelError(f"corrupt quantized model directory {path}: missing {empty[:3]} unexpected {unexpected[:3]}")
    model.eval()
    if head == "int8":
        name, choices[name] = quantize_head(model, dev)
    # the fake input quantizer stays on linears that run in float; Int8Linear quantizes its own inputs
    attach_input_quantizers(model, {n: a for n, a in acts.items() if choices.get(n, LinearChoice("", "")).kind != "w8a8"})
    attach_output_quantizers(model, info.get("output_quantizers", {}))
    return model, tok, info, PackReport(choices)
