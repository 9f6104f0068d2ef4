"""FP8 E4M3 (Micikevicius et al., arXiv 2209.05433): weights (and optionally activations) in fp8.

Weights: scale = amax / 448 per tensor or per output channel, values rounded to the nearest
E4M3 number (torch.float8_e4m3fn); codes are saved as float8 tensors. Activations (abits 8):
dynamic E4M3 fake-quant per token (or per tensor with act_per_token false). No calibration.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from ..config import KEEP_BITS, PER_CHANNEL, PER_TENSOR
from ..quant.primitives import QuantSpec, quantize_weight
from .base import BlockContext, LinearPlan, Method, SolveResult, StageConfig, register


class FP8Config(StageConfig):
    wbits: int = 8  # 8 = fp8 weights, 16 = keep weights (activations only)
    abits: int = 8  # 8 = fp8 activations, 16 = weight-only
    granularity: Literal["tensor", "channel"] = "channel"

    @field_validator("wbits", "abits")
    @classmethod
    def _eight(cls, v: int) -> int:
        if v not in (8, 16):
            raise ValueError(f"fp8 is 8 bits (or 16 = keep floating point), got {v}")
        return v

    not_applicable = ("group_size", "sym")
    not_applicable_hint = "fp8 (use granularity: tensor | channel)"

    @model_validator(mode="after")
    def _override_bits(self) -> FP8Config:
        for rule in self.overrides:
            if rule.wbits not in (None, 8, KEEP_BITS) or rule.abits not in (None, 8, KEEP_BITS):
                raise ValueError("overrides: fp8 bits must be 8 or 16")
            if rule.group_size is not None or rule.sym is not None:
                raise ValueError("overrides: group_size / sym do not apply to fp8")
        return self


def fp8_plan(plan: LinearPlan, granularity: str) -> LinearPlan:
    """The int plan from the shared targeting rules, turned into fp8 formats."""
    gs = PER_TENSOR if granularity == "tensor" else PER_CHANNEL
    weight = QuantSpec(bits=8, group_size=gs, symmetric=True, dtype="fp8") if plan.weight is not None else None
    act = QuantSpec(bits=8, group_size=PER_TENSOR, symmetric=True, dtype="fp8") if plan.act is not None else None
    return LinearPlan(weight, act, plan.act_per_token)


@register("fp8")
class FP8(Method):
    """E4M3 weights per tensor/channel and dynamic E4M3 activations."""

    Config = FP8Config
    config: FP8Config
    needs_calibration = False

    def process_block(self, ctx: BlockContext) -> None:
        for n in (n for g in ctx.groups() for n in g):
            base = ctx.plan(self.config, n)
            if base is None:
                continue
            plan = fp8_plan(base, self.config.granularity)
            result = None
            if plan.weight is not None:
                w = ctx.linear(n).weight.detach().float()
                q = quantize_weight(w, plan.weight)
                wq = q.dequantize()
                rel = float((wq - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
                result = SolveResult(wq, q, {"weight_rel_err": rel})
            ctx.commit(n, result, plan)
