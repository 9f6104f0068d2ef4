"""A real FP8 W8A8 linear: E4M3 weights (per output channel or per tensor), inputs quantized to
E4M3 per token (or per tensor, or with a calibrated static scale) at run time, and one fp8 GEMM:

    y = s_x * s_w * (q_x @ q_w^T) + bias

q_x, q_w are the E4M3 codes, s_x, s_w their float32 scales. torch._scaled_mm multiplies the codes
with unit scales and float32 output (every fp8 x fp8 product is exact in float32), and the scales
are applied afterwards, so the result equals the fake-quant model's F.linear(fake_quant(x), dequant(W))
up to the GEMM's accumulation, whatever the scale granularity (cuBLAS row-wise scaling is sm90-only
and bf16-only). On the CPU the sums are float32; Hopper's fp8 tensor cores keep fewer accumulator
bits (the DeepSeek-V3 report, section 3.3.2, finds about 14), which an H200 showed as 1.2-1.7e-4
of the largest output at Llama-2-7B shapes: FP8_GEMM_TOLERANCE bounds it.

Kernels (reported by `kernel`, and `reason` when not the GEMM):
- "fp8-scaled-mm": torch._scaled_mm, on CUDA sm89+ (models.capability), K and N multiples of 16;
- elsewhere quant.inference keeps the exact fake-quant (a float linear holding the fp8 values and
  the fake input quantizer) and reports why. The same class also runs on a CPU when asked for by
  name (torch's CPU _scaled_mm), which is how the arithmetic is tested without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models import capability as _cap
from ..models.capability import Capability, Choice
from .int8linear import ScaledCodesLinear
from .primitives import FP8_E4M3_MAX, QuantizedWeight, QuantSpec

FP8_GEMM_TOLERANCE = 1e-3  # max error / max |output| of the fp8 GEMM against the fake-quant (see above)

KERNELS = ("fp8-scaled-mm",)


def fp8_problem(qw: QuantizedWeight, act: dict[str, Any] | None) -> str | None:
    """Why FP8Linear cannot run this weight with this input quantizer (None = it can), on any device."""
    spec = qw.spec
    if spec.dtype != "fp8":
        return f"{spec.describe()} weights are not fp8"
    if act is None:
        return "fp8 weights with float inputs (weight-only fp8 runs as the fake-quant; an fp8 GEMM needs fp8 inputs)"
    aspec = QuantSpec(**act["spec"])
    if aspec.dtype != "fp8":
        return f"fp8 weights with {aspec.describe()} inputs"
    if spec.group_size > 0 or qw.g_idx is not None:
        return f"fp8 weight groups of {spec.group_size} (the fp8 GEMM takes one scale per output channel)"
    return None


def fp8_choice(qw: QuantizedWeight, act: dict[str, Any] | None, capability: Capability) -> Choice:
    """The kernel an fp8 layer runs on a device of `capability`: "fp8-scaled-mm", or "float"
    (the exact fake-quant) with the reason."""
    why = fp8_problem(qw, act)
    if why is not None:
        return Choice("float", why)
    choice = capability.fp8()
    out_f, in_f = qw.codes.shape
    if choice.reason is None and capability.kind == "cuda" and (in_f % 16 or out_f % 16):
        return Choice("float", f"shape {out_f}x{in_f} (fp8 GEMMs need multiples of 16)")
    return choice


def fp8_activation_codes(
    x: torch.Tensor, per_token: bool = True, static_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes and float32 scales of x [M, K], rounded exactly as quant.primitives'
    fp8 fake quant rounds them: fake(x) == codes * scale."""
    xf = x.float()
    if static_scale is not None:
        scale = torch.full((1, 1), static_scale, dtype=torch.float32, device=x.device)
    else:
        amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax().reshape(1, 1)
        scale = (amax / FP8_E4M3_MAX).clamp_min(1e-12)
    codes = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


class FP8Linear(ScaledCodesLinear):
    """y = x @ W^T + b with E4M3 weights and dynamically E4M3-quantized inputs (see module doc)."""

    qweight: torch.Tensor  # [N, K] float8_e4m3fn
    wscale: torch.Tensor  # [N] float32
    one: torch.Tensor  # unit scale of the GEMM (the real scales are applied to its float32 output)
    bias: torch.Tensor | None

    problem = staticmethod(fp8_problem)

    def _build(
        self, qw: QuantizedWeight, act: dict[str, Any], kernel: str, device: torch.device, capability: Capability | None
    ) -> None:
        if kernel == "auto":
            choice = fp8_choice(qw, act, capability or _cap.detect(device))
            if choice.reason is not None:
                raise ValueError(f"FP8Linear cannot run this layer here: {choice.reason}")
            kernel = choice.kernel
        if kernel not in KERNELS:
            raise ValueError(f"unknown fp8 kernel {kernel!r}; allowed: auto, {', '.join(KERNELS)}")
        self.kernel = kernel
        out_f = self.out_features
        self.register_buffer("qweight", qw.codes.to(torch.float8_e4m3fn).contiguous().to(device))
        scale = qw.scale.float().reshape(-1)
        self.register_buffer("wscale", (scale.expand(out_f).contiguous() if scale.numel() == 1 else scale).to(device))
        # persistent (in the state dict) so a module built on meta gets it from its weight source
        self.register_buffer("one", torch.ones((), dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, s = fp8_activation_codes(x.reshape(-1, shape[-1]), self.per_token, self.static_scale)
        # [K, N] column-major view of the [N, K] row-major codes: what the fp8 GEMM takes
        acc = torch._scaled_mm(q, self.qweight.t(), scale_a=self.one, scale_b=self.one, out_dtype=torch.float32)
        return self._rescale(acc, s, x)
