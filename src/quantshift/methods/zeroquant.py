"""ZeroQuant (Yao et al., arXiv 2206.01861): group-wise weights, token-wise dynamic activations.

Weights are rounded to nearest on a symmetric grid with one scale per group of input columns;
every linear input is fake-quantized at run time with one symmetric range per token (W8A8, W4A8).
The paper's optional layer-by-layer knowledge distillation (LKD) is not implemented: this is the
calibration-free variant, so it needs no calibration data.
"""

from __future__ import annotations

import torch.nn as nn
from pydantic import model_validator

from ..quant.primitives import quantize_weight
from .base import LinearMethod, LinearPlan, SolveResult, StageConfig, register


class ZeroQuantConfig(StageConfig):
    wbits: int = 8
    group_size: int = 64
    sym: bool = True
    abits: int = 8
    act_per_token: bool = True

    @model_validator(mode="after")
    def _token_wise(self) -> "ZeroQuantConfig":
        if not self.act_per_token:
            raise ValueError("act_per_token: ZeroQuant quantizes activations token-wise; use rtn for per-tensor")
        return self


@register("zeroquant")
class ZeroQuant(LinearMethod):
    """Group-wise symmetric RTN weights + per-token dynamic activation fake-quant."""

    Config = ZeroQuantConfig
    needs_calibration = False

    def solve(self, name: str, linear: nn.Linear, stats: None, plan: LinearPlan) -> SolveResult:
        assert plan.weight is not None
        w = linear.weight.detach().float()
        q = quantize_weight(w, plan.weight)
        wq = q.dequantize()
        rel = float((wq - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
        return SolveResult(wq, q, {"weight_rel_err": rel})
