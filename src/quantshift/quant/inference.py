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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..errors import ModelError
from ..models import capability as _cap
from ..models.capability import Capability
from ..models.lazy import FakeQuantSource, WeightSource
from .actquant import attach_input_quantizers, attach_output_quantizers
from .fp8linear import FP8Linear, fp8_choice
from .int8linear import Int8Linear, int8_choice, w8a8_problem
from .primitives import QuantizedWeight, QuantSpec, quantize_weight
from .qlinear import PackedLinear, int4_choice

if TYPE_CHECKING:
    from ..checkpoint import QuantizedDir


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
        return {
            "counts": self.counts(),
            "fallbacks": self.fallbacks(),
            "modules": {n: asdict(c) for n, c in self.choices.items()},
        }


def w8a8_choice(lin: Int8Linear | FP8Linear, device: torch.device | None = None) -> LinearChoice:
    """What an Int8Linear / FP8Linear runs on; the reason names why it is not the GEMM when it is not."""
    return LinearChoice("w8a8", lin.kernel, lin.reason)


def choose_linear(
    name: str,
    qw: QuantizedWeight,
    act: dict | None,
    device: torch.device,
    has_outliers: bool = False,
    capability: Capability | None = None,
) -> LinearChoice:
    """What one quantized linear runs as on `device` (see the module doc), from the format, the
    shapes and the device's capability (default: detected), never from values, so a skeleton on
    meta gets the same choice."""
    spec = qw.spec
    cap = capability or _cap.detect(device)
    reason: str | None
    if has_outliers:
        reason = "sparse 16-bit outliers (SpQR) have no packed kernel"
    elif spec.dtype == "fp8":
        choice = fp8_choice(qw, act, cap)
        reason = choice.reason
        if reason is None and act is not None:
            return LinearChoice("w8a8", choice.kernel, None)
    elif spec.dtype != "int":
        reason = f"{spec.describe()} weights have no packed kernel here"
    elif act is not None:
        reason = w8a8_problem(qw, act)
        if reason is None:
            c8 = int8_choice(qw.codes.shape[0], qw.codes.shape[1], cap)
            return LinearChoice("w8a8", c8.kernel, c8.reason)
    elif 32 % spec.bits:
        reason = f"{spec.bits}-bit codes do not pack into int32 words"
    else:
        c4 = int4_choice(qw, cap)
        return LinearChoice(f"w{spec.bits}a16", c4.kernel, c4.reason)
    return LinearChoice("float", "float", reason)


def make_linear(
    choice: LinearChoice,
    qw: QuantizedWeight,
    act: dict | None,
    bias: torch.Tensor | None,
    device: torch.device | str,
    dtype: torch.dtype,
    dense: torch.Tensor | None = None,
) -> nn.Module:
    """The inference module `choice` names, built from `qw` (meta tensors build a skeleton);
    `dense`: the float weight of a "float" choice (None: left empty, to be filled later)."""
    device = torch.device(device)
    if choice.kind == "w8a8":
        lin: Int8Linear | FP8Linear
        if qw.spec.dtype == "fp8":
            lin = FP8Linear(qw, act or {}, bias, choice.kernel, device)
        else:
            lin = Int8Linear(qw, act or {}, bias, kernel=choice.kernel, device=device)
        lin.reason = choice.reason
        return lin
    if choice.kind != "float":
        packed = PackedLinear(qw, bias, choice.kernel, device, dtype)  # type: ignore[arg-type]
        packed.fallback_reason = choice.reason
        return packed
    out_f, in_f = qw.codes.shape
    lin_f = nn.Linear(in_f, out_f, bias=bias is not None, device="meta" if dense is None else device, dtype=dtype)
    if dense is not None:
        with torch.no_grad():
            lin_f.weight.copy_(dense)
            if bias is not None:
                lin_f.bias.copy_(bias)
    return lin_f


def plan_packed(
    model: nn.Module, qdir: QuantizedDir, dtype: torch.dtype, device: torch.device
) -> dict[str, LinearChoice]:
    """Replace each quantized linear of a skeleton (on meta) by the inference module it will run
    as on `device`, still on meta; returns name -> choice."""
    modules = dict(model.named_modules())
    acts = qdir.acts
    cap = _cap.detect(device)
    choices: dict[str, LinearChoice] = {}
    for name in qdir.specs:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise ModelError(f"corrupt quantized model directory {qdir.path}: {name} is not a linear of this model")
        qw = qdir.meta_weight(name)
        choice = choose_linear(name, qw, acts.get(name), device, qdir.has(name, "outlier_idx"), cap)
        new = make_linear(choice, qw, acts.get(name), lin.bias, torch.device("meta"), dtype)  # chosen for `device`
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new)
        choices[name] = choice
    return choices


def build_linear(
    qdir: QuantizedDir, name: str, device: torch.device, dtype: torch.dtype, choice: LinearChoice
) -> tuple[nn.Module, LinearChoice]:
    """The inference module of one stored linear, built from its codes on `device`."""
    from ..checkpoint import dense_weight

    qw = qdir.quantized_weight(name)
    bias = qdir.tensors.get(f"{name}.bias") if f"{name}.bias" in qdir.tensors else None
    dense = dense_weight(qw) if choice.kind == "float" else None
    return make_linear(choice, qw, qdir.acts.get(name), bias, device, dtype, dense), choice


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
    return name, w8a8_choice(lin)


class PackedSource(WeightSource):
    """A quantized directory whose quantized linears are inference modules (quant.inference):
    reading any buffer of such a module builds the module from its codes on the compute device and
    returns that buffer on the host (the last built module is kept, as a module's buffers are read together)."""

    def __init__(
        self,
        qdir: QuantizedDir,
        model: nn.Module,
        choices: dict[str, LinearChoice],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.packed = {n for n, c in choices.items() if c.kind != "float"}
        self.floats = FakeQuantSource(qdir, model, skip_owners=self.packed)
        self.qdir, self.choices, self.dtype, self.device = qdir, choices, dtype, device
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None

    def _owner(self, name: str) -> str | None:
        owner = name.rsplit(".", 1)[0]
        return owner if owner in self.packed else None

    def _module_state(self, owner: str) -> dict[str, torch.Tensor]:
        if self._last is None or self._last[0] != owner:
            # built where it runs: a kernel's packed layout is made by that device's own op (the CUDA
            # int4 layout cannot be made on the CPU); the buffers then wait on the host like any weight
            module, _ = build_linear(self.qdir, owner, self.device, self.dtype, self.choices[owner])
            self._last = (owner, {k: v.to("cpu") for k, v in module.state_dict().items()})
        return self._last[1]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        rest = []
        for n in names:
            owner = self._owner(n)
            if owner is None:
                rest.append(n)
            else:
                out[n] = self._module_state(owner)[n[len(owner) + 1 :]]
        out.update(self.floats.read(rest))
        return out

    def stored_dtype(self, name: str) -> torch.dtype | None:
        return self.floats.stored_dtype(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.floats.read_rows(name, start, stop)


def load_packed(
    path: Path, dtype: torch.dtype, device: str, verify: bool = True, head: str = "float"
) -> tuple[nn.Module, Any, dict, PackReport]:
    """(model, tokenizer, quantshift.json, report) of a quantized directory with packed linears,
    built module by module (a quantized linear's float weight never exists); `head`: "float"
    (the output projection as stored) or "int8" (see quantize_head)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
    from ..checkpoint import QuantizedDir
    from ..models.lazy import materialize_all

    dev = torch.device(device)
    qdir = QuantizedDir(path, verify)
    model, choices = packed_skeleton(qdir, dtype, dev)
    materialize_all(model, PackedSource(qdir, model, choices, dtype, dev), dev)
    if head == "int8":
        name, choices[name] = quantize_head(model, dev)
    attach_packed_quantizers(model, qdir, choices)
    return model, qdir.tokenizer(), qdir.info, PackReport(choices)


def packed_skeleton(
    qdir: QuantizedDir, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, dict[str, LinearChoice]]:
    """The packed model of a quantized directory on meta, and each quantized linear's choice."""
    from ..models.lazy import empty_model

    model = empty_model(qdir.config(), dtype)
    return model, plan_packed(model, qdir, dtype, device)


def attach_packed_quantizers(model: nn.Module, qdir: QuantizedDir, choices: dict[str, LinearChoice]) -> None:
    """The fake input quantizer stays on linears that run in float; Int8Linear quantizes its own inputs."""
    acts = qdir.acts
    attach_input_quantizers(
        model, {n: a for n, a in acts.items() if choices.get(n, LinearChoice("", "")).kind != "w8a8"}
    )
    attach_output_quantizers(model, qdir.info.get("output_quantizers", {}))
