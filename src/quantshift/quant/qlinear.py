"""A packed W4A16 linear: int4 codes packed 8 per int32 word plus per-group scales and zero
points, dequantized on the fly (the weight never exists in float between calls).

Backends (chosen once, when the layer is built):
- "dequant": unpack + `scale * (code - zero)` + F.linear; any device, bits 2/4/8, act-order
  g_idx, partial groups. The reference the others are tested against.
- "int4mm-cpu": torch's int4 "tinygemm" CPU kernel (aten._weight_int4pack_mm_for_cpu).
- "int4mm-cuda": the same kernel family on CUDA (aten._weight_int4pack_mm, bfloat16), which is
  what torchao's int4 weight-only tensor-core layout calls; torchao itself is not required. Its
  tensor-core instructions need sm80+: on older GPUs "auto" dequantizes on the fly and says why
  (the device's part of the choice comes from models.capability).
Both int4mm kernels take sequential groups of 32/64/128/256 columns and express the zero point
as a float offset: W = (c - 8) * s + s * (8 - z), algebraically equal to s * (c - z).
Both run in bfloat16 (activations, scales): with float32 inputs the CPU kernel takes a slow
reference path (measured 50-200x slower than bf16 at 576x1536, M=1..8), so float32 inputs are
cast to bf16 and the output back. The CPU kernel also needs out_features % 16 == 0
(`int4_cpu_shape_problem`); other shapes fall back to "dequant".
"""

from __future__ import annotations

import importlib.util
from typing import Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import capability as _cap
from ..models.capability import Capability, Choice
from .primitives import QuantizedWeight, expand_to_columns, pack_codes, unpack_codes

Backend = Literal["auto", "dequant", "int4mm-cpu", "int4mm-cuda"]
_TINYGEMM_GROUPS = (32, 64, 128, 256)
_KERNEL = {"int4mm-cuda": torch.device("cuda"), "int4mm-cpu": torch.device("cpu")}


def torchao_version() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return None
    import torchao

    return getattr(torchao, "__version__", "unknown")


def int4mm_unsupported_reason(
    qw: QuantizedWeight, device: torch.device, capability: Capability | None = None
) -> str | None:
    """Why the int4mm kernels cannot run this weight on `device` (None = they can); the device's
    part of the answer comes from its capability (models.capability: sm80+ on CUDA)."""
    out_f, in_f = qw.codes.shape
    spec = qw.spec
    if spec.bits != 4 or spec.dtype != "int":
        return f"{spec.describe()} is not int4"
    if qw.g_idx is not None:
        return "act-order g_idx (scattered groups)"
    if spec.group_size not in _TINYGEMM_GROUPS or in_f % spec.group_size:
        return f"group size {spec.group_size} with {in_f} inputs (needs whole groups of {_TINYGEMM_GROUPS})"
    cap = capability or _cap.detect(device)
    why = cap.int4().reason
    if why is not None:
        return why
    if cap.kind == "cuda" and (out_f % 8 or in_f % 128):  # innerKTiles = 8 -> K a multiple of 8 * 16
        return f"shape {out_f}x{in_f} (needs out % 8 == 0 and in % 128 == 0)"
    return None


def int4_cpu_shape_problem(out_f: int, device: torch.device) -> str | None:
    """Why the CPU int4 kernel's packing refuses this output width (None = it accepts it)."""
    if device.type == "cpu" and out_f % 16:
        return f"{out_f} outputs (the CPU int4 kernel packs multiples of 16)"
    return None


def int4_problem(qw: QuantizedWeight, device: torch.device, capability: Capability | None = None) -> str | None:
    """Why no int4mm kernel can run `qw` on `device` (None = one can)."""
    cap = capability or _cap.detect(device)
    return int4mm_unsupported_reason(qw, device, cap) or int4_cpu_shape_problem(
        qw.codes.shape[0], torch.device(cap.kind)
    )


def int4_choice(qw: QuantizedWeight, capability: Capability) -> Choice:
    """The W4A16 kernel PackedLinear("auto") picks for `qw` on a device of `capability`, with the
    reason when it is the dequantize-on-the-fly fallback."""
    why = int4_problem(qw, torch.device(capability.kind), capability)
    return Choice("dequant", why) if why else capability.int4()


class PackedLinear(nn.Module):
    """y = x @ dequant(codes, scales, zeros)^T + bias, from packed codes."""

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        backend: Backend = "auto",
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype | None = None,
        capability: Capability | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        out_f, in_f = qw.codes.shape
        self.in_features, self.out_features = in_f, out_f
        self.spec = qw.spec
        if qw.spec.dtype != "int" or 32 % qw.spec.bits:
            raise ValueError(f"PackedLinear packs 2, 4 or 8-bit integer grids, not {qw.spec.describe()}")
        self.fallback_reason: str | None = None  # why "auto" fell back to dequant
        if backend == "auto":
            choice = int4_choice(qw, capability or _cap.detect(device))
            self.fallback_reason = choice.reason
            backend = cast(Backend, choice.kernel)
        elif backend != "dequant":
            if backend not in _KERNEL:
                raise ValueError(f"unknown backend {backend!r}; allowed: auto, dequant, {', '.join(_KERNEL)}")
            why = int4_problem(qw, _KERNEL[backend])
            if why is not None:
                raise ValueError(f"backend {backend} cannot run this weight: {why}")
        self.backend: str = backend
        # both int4 kernels run in bfloat16 (see the module docstring)
        self.compute_dtype = torch.bfloat16 if backend != "dequant" else (compute_dtype or torch.float32)
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, self.compute_dtype))
        scale, zero = qw.scale.float(), qw.zero.float()
        if backend == "dequant":
            self.register_buffer("qweight", pack_codes(qw.codes, qw.spec.bits, dim=1).to(device))
            self.register_buffer("scales", scale.to(device, self.compute_dtype))
            self.register_buffer("zeros", zero.to(device, self.compute_dtype))
            self.register_buffer("g_idx", None if qw.g_idx is None else qw.g_idx.to(device))
        else:
            gs = qw.spec.group_size
            # tinygemm: per group [scale, offset] with W = (c - 8) * scale + offset
            sz = torch.stack([scale, scale * (8 - zero)], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
            if backend == "int4mm-cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32), 2)
            else:
                c = qw.codes.to(torch.uint8).to(device)
                packed = torch.ops.aten._convert_weight_to_int4pack((c[:, ::2] << 4) | c[:, 1::2], 8)
            self.register_buffer("qweight", packed.to(device))
            self.register_buffer("scales_and_zeros", sz.to(device, self.compute_dtype))
            self.group_size = gs

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (for tests and the dequant backend)."""
        if self.backend != "dequant":
            raise RuntimeError("dequantized_weight is defined for the dequant backend")
        qweight, scales, zeros = self._buf("qweight"), self._buf("scales"), self._buf("zeros")
        codes = unpack_codes(qweight, self.spec.bits, self.in_features, dim=1)
        g_idx = self.g_idx
        if isinstance(g_idx, torch.Tensor):
            s, z = scales[:, g_idx], zeros[:, g_idx]
        else:
            gs = self.spec.group_size if self.spec.group_size > 0 else -1
            s = expand_to_columns(scales, self.in_features, gs)
            z = expand_to_columns(zeros, self.in_features, gs)
        return s * (codes.to(s.dtype) - z)

    def _buf(self, name: str) -> torch.Tensor:
        t = getattr(self, name)
        assert isinstance(t, torch.Tensor)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        bias = self.bias if isinstance(self.bias, torch.Tensor) else None
        if self.backend == "dequant":
            y = F.linear(x2, self.dequantized_weight(), bias)
        else:
            if self.backend == "int4mm-cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group_size, self.scales_and_zeros)
            if bias is not None:
                y = y + bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}, backend={self.backend}"


def pack_model(
    model: nn.Module,
    weights: dict[str, QuantizedWeight],
    backend: Backend = "auto",
    compute_dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Replace each named nn.Linear that has codes by a PackedLinear; returns name -> backend."""
    modules = dict(model.named_modules())
    chosen: dict[str, str] = {}
    for name, qw in weights.items():
        lin = modules[name]
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, not nn.Linear")
        dev = lin.weight.device
        packed = PackedLinear(qw, lin.bias, backend, dev, compute_dtype)
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, leaf, packed)
        chosen[name] = packed.backend
    return chosen
