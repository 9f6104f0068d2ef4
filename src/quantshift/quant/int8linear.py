"""A real W8A8 linear: int8 weights (per channel or per tensor), inputs quantized to int8 per
token at run time, integer products on int8 units (the CPU's dot-product instructions, a GPU's
int8 tensor cores).

    y = s_x * s_w * (q_x @ (c_w - o)^T  -  rowsum(q_x) * (z_w - o)) + bias

with q_x the signed activation codes, c_w the stored weight codes, o = 2**(bits-1) (so c_w - o
fits int8 for any width <= 8) and z_w the weight zero point (the correction term vanishes on
symmetric grids). The integer sum is exact, so the result equals the fake-quant model's
F.linear(fake_quant(x), dequant(W)) up to float32 rounding of that float GEMM.

Kernels (chosen once per layer from the device's capability, models.capability; reported by
`kernel`, and `reason` when it is the emulation):
- "int8-intmm": torch._int_mm: oneDNN s8s8s32 on x86 CPUs with VNNI/AMX; cuBLASLt on CUDA sm75+,
  which takes K and N multiples of 8 and more than 16 rows (fewer rows, as in decoding, are
  padded with zero rows, whose products are zero and are dropped). On the CPU chosen over onednn.qlinear_pointwise
  (prepacked, uint8 activations) by an interleaved microbenchmark at SmolLM2's shapes
  (576x576, 576x1536, 1536x576; 1 thread, AMD EPYC with AVX512-VNNI and no AMX, on a loaded
  machine, activation quantization included): _int_mm was faster at M=1 and M=8 (0.24-0.75x
  float32 F.linear except 576x576 M=1, where fp32 stays in cache), mixed at M=512 (0.36-0.64x
  float32; oneDNN 0.26-0.41x); bf16 F.linear was 0.20-0.29x float32 at M=512.
- "int8-emulated": the same integer arithmetic on float matmuls (exact for K < 2**24 / 2**14),
  for CPUs without int8 dot-product instructions, GPUs older than sm75, other devices and shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..models import capability as _cap
from ..models.capability import INT8_FLAGS, Capability, Choice
from .primitives import QuantizedWeight, QuantSpec

__all__ = ["INT8_FLAGS", "Int8Linear", "activation_codes", "int8_choice", "int8_units_missing", "w8a8_problem"]
_CUDA_MIN_ROWS = 17  # cuBLASLt's int8 GEMM in torch._int_mm takes more than 16 rows


def int8_units_missing(flags: set[str] | None = None) -> str | None:
    """Why this CPU has no int8 matrix units (None = it has them)."""
    cap = _cap.detect("cpu") if flags is None else _cap.fake("cpu", flags=flags)
    return cap.int8().reason


def int8_choice(out_f: int, in_f: int, cap: Capability) -> Choice:
    """The kernel an [out_f, in_f] Int8Linear runs on a device of capability `cap`, and why not
    the integer GEMM when it is not."""
    choice = cap.int8()
    if choice.reason is None and cap.kind == "cuda" and (in_f % 8 or out_f % 8):
        return Choice("int8-emulated", f"shape {out_f}x{in_f} (cuBLAS int8 GEMMs need multiples of 8)")
    return choice


def w8a8_problem(qw: QuantizedWeight, act: dict[str, Any]) -> str | None:
    """Why Int8Linear cannot run this weight with this input quantizer (None = it can)."""
    spec, aspec = qw.spec, QuantSpec(**act["spec"])
    if spec.dtype != "int" or aspec.dtype != "int":
        return f"weights {spec.describe()} / inputs {aspec.describe()} are not integer grids"
    if spec.group_size > 0:
        return f"weight groups of {spec.group_size} (int8 GEMMs take one scale per output channel)"
    if qw.g_idx is not None:
        return "act-order g_idx"
    if not aspec.symmetric:
        return "asymmetric input grid"
    return None


def activation_codes(
    x: torch.Tensor, spec: QuantSpec, per_token: bool = True, static_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 codes and scales of x [M, K] exactly as quant.actquant's symmetric fake quant
    rounds them: fake(x) == scale * codes."""
    xf = x.float()
    half = 2 ** (spec.bits - 1)
    if static_scale is not None:
        scale = torch.full((1, 1), static_scale, dtype=torch.float32, device=x.device)
    else:
        if per_token:
            lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
        else:
            lo, hi = xf.amin().reshape(1, 1), xf.amax().reshape(1, 1)
        amax = torch.maximum(-lo.clamp_max(0), hi.clamp_min(0))
        scale = 2 * amax / spec.maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(xf / scale), -half, spec.maxq - half)
    return codes.to(torch.int8), scale


class ScaledCodesLinear(nn.Module):
    """What a W8A8 linear does after its GEMM of codes (int8 here, fp8 in quant.fp8linear): scale
    the accumulator by input and weight scales, add the bias, restore the input's shape and dtype."""

    wscale: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    spec: QuantSpec
    act_spec: QuantSpec
    per_token: bool
    kernel: str
    problem: Callable[[QuantizedWeight, dict[str, Any]], str | None]  # why this class cannot run a layer

    def __init__(
        self,
        qw: QuantizedWeight,
        act: dict[str, Any],
        bias: torch.Tensor | None = None,
        kernel: str = "auto",
        device: torch.device | str = "cpu",
        capability: Capability | None = None,
    ) -> None:
        super().__init__()
        why = type(self).problem(qw, act)
        if why is not None:
            raise ValueError(f"{type(self).__name__} cannot run this layer: {why}")
        out_f, in_f = qw.codes.shape
        self.in_features, self.out_features = in_f, out_f
        self.spec, self.act_spec = qw.spec, QuantSpec(**act["spec"])
        self.per_token = bool(act.get("per_token", True))
        self.static_scale: float | None = act.get("static_scale")
        self.reason: str | None = None  # why "auto" chose an emulation
        self._build(qw, act, kernel, torch.device(device), capability)
        self.register_buffer("bias", None if bias is None else bias.detach().float().to(device))

    def _build(
        self, qw: QuantizedWeight, act: dict[str, Any], kernel: str, device: torch.device, capability: Capability | None
    ) -> None:
        """Choose the kernel, register the weight's codes and scales (the subclass's format)."""
        raise NotImplementedError

    def _rescale(self, acc: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = acc * (s * self.wscale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, W {self.spec.describe()}, "
            f"A {self.act_spec.describe()}{' per-token' if self.per_token else ''}, kernel={self.kernel}"
        )


class Int8Linear(ScaledCodesLinear):
    """y = x @ W^T + b with int8 weights and dynamically int8-quantized inputs (see module doc)."""

    qweight: torch.Tensor  # [N, K] int8: codes - 2**(bits-1)
    wscale: torch.Tensor  # [N] float32
    zero_corr: torch.Tensor | None  # [N] weight zero point - 2**(bits-1); None on symmetric grids
    bias: torch.Tensor | None

    problem = staticmethod(w8a8_problem)

    def _build(
        self, qw: QuantizedWeight, act: dict[str, Any], kernel: str, device: torch.device, capability: Capability | None
    ) -> None:
        out_f, in_f = self.out_features, self.in_features
        if kernel == "auto":
            choice = int8_choice(out_f, in_f, capability or _cap.detect(device))
            kernel, self.reason = choice.kernel, choice.reason
        if kernel not in ("int8-intmm", "int8-emulated"):
            raise ValueError(f"unknown int8 kernel {kernel!r}; allowed: auto, int8-intmm, int8-emulated")
        self.kernel = kernel
        off = 2 ** (qw.spec.bits - 1)
        codes = (qw.codes.to(torch.int16) - off).to(torch.int8).to(device)
        if kernel == "int8-intmm" and device.type == "cuda":
            # cuBLAS' int8 GEMM wants its [K, N] operand contiguous (a transposed view can give
            # wrong results): keep the codes laid out that way, still seen as [N, K]
            codes = codes.t().contiguous().t()
        # on the CPU, qweight.t() is the [K, N] view _int_mm takes, without a transposed copy
        self.register_buffer("qweight", codes)
        scale = qw.scale.float().reshape(-1)
        zero = qw.zero.float().reshape(-1)
        self.register_buffer(
            "wscale", scale.expand(out_f).contiguous().to(device) if scale.numel() == 1 else scale.to(device)
        )
        corr = (zero - off).expand(out_f).contiguous() if zero.numel() == 1 else zero - off
        # decided by the format, not the values, so a skeleton on meta has the same buffers (an
        # asymmetric grid whose zeros all equal the offset subtracts exact zeros)
        self.register_buffer("zero_corr", None if qw.spec.symmetric else corr.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, s = activation_codes(x.reshape(-1, shape[-1]), self.act_spec, self.per_token, self.static_scale)
        if self.kernel == "int8-intmm":
            rows = q.shape[0]
            if q.is_cuda and rows < _CUDA_MIN_ROWS:  # zero rows: zero products, dropped below
                q_mm = torch.cat([q, q.new_zeros(_CUDA_MIN_ROWS - rows, q.shape[1])])
                acc = torch._int_mm(q_mm, self.qweight.t())[:rows].float()
            else:
                acc = torch._int_mm(q, self.qweight.t()).float()
        else:
            acc = q.float() @ self.qweight.t().float()
        if self.zero_corr is not None:
            acc = acc - q.sum(dim=1, keepdim=True, dtype=torch.int32).float() * self.zero_corr
        return self._rescale(acc, s, x)
