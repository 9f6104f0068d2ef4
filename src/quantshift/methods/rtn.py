"""RTN: round each weight to the nearest point of its group's grid; no calibration data."""

from __future__ import annotations

from typing import ClassVar

import torch.nn as nn

from ..quant.primitives import quantize_weight
from .base import LinearMethod, LinearPlan, SolveResult, StageConfig, register


class RTNConfig(StageConfig):
    pass


@register("rtn")
class RTN(LinearMethod):
    Config: ClassVar[type[StageConfig]] = RTNConfig
    needs_calibration = False

    def solve(self, name: str, linear: nn.Linear, stats: None, plan: LinearPlan) -> SolveResult:
        assert plan.weight is not None
        w = linear.weight.detach().float()
        q = quantize_weight(w, plan.weight)
        wq = q.dequantize()
        rel = float((wq - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
        return SolveResult(wq, q, {"weight_rel_err": rel})
