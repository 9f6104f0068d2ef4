"""ZeroQuant (Yao et al., arXiv 2206.01861): group-wise weights, token-wise dynamic activations.

Weights are rounded to nearest on a symmetric grid with one scale per group of input columns;
every linear input is fake-quantized at run time with one symmetric range per token (W8A8, W4A8).
The paper's optional layer-by-layer knowledge distillation (LKD) is not implemented: this is the
calibration-free variant, so it needs no calibration data.
"""

from __future__ import annotations

from pydantic import model_validator

from .base import StageConfig, register
from .rtn import RTN


class ZeroQuantConfig(StageConfig):
    wbits: int = 8
    group_size: int = 64
    sym: bool = True
    abits: int = 8
    act_per_token: bool = True

    @model_validator(mode="after")
    def _token_wise(self) -> ZeroQuantConfig:
        if not self.act_per_token:
            raise ValueError("act_per_token: ZeroQuant quantizes activations token-wise; use rtn for per-tensor")
        return self


@register("zeroquant")
class ZeroQuant(RTN):
    """Group-wise symmetric RTN weights + per-token dynamic activation fake-quant."""

    Config = ZeroQuantConfig  # RTN's solver; the format and the activation quantizer differ
