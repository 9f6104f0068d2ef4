"""SmoothQuant (Xiao et al., arXiv 2211.10438): migrate activation outliers into the weights.

Per input channel j of the linears reading a norm's output: s_j = max|X_j|^alpha /
max|W_j|^(1-alpha) (max over calibration tokens, and over the rows of every linear of the
mapping). 1/s is folded into the norm and s into the linears' columns, which flattens activation
outlier channels at the cost of slightly harder weights. Then W8A8: per-channel symmetric weights
(RTN) and per-token dynamic symmetric activations, or per-tensor static activation scales
calibrated on the smoothed inputs (`act_static`). W4A8 etc. by setting wbits / group_size.

By default only the norm -> linears mappings are smoothed, as in the paper; `fold_into_linears`
also folds through v -> o and up -> down where shapes allow.

With `quantize: false` the stage only smooths (a transform): a later stage (e.g. GPTQ with
abits 8) quantizes the smoothed weights and attaches the activation quantizers.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError, field_validator, model_validator

from ..config import KEEP_BITS, number_in
from ..quant.primitives import qparams_from_range, quantize_weight
from ..quant.smoothing import block_mappings, collect_input_stats, fold_scale, representatives
from .base import BlockContext, Method, SolveResult, StageConfig, block_plans, register


class SmoothQuantConfig(StageConfig):
    wbits: int = 8
    group_size: int = -1  # per output channel
    sym: bool = True
    abits: int = 8
    alpha: float = 0.5  # migration strength: 0 = nothing moves, 1 = all of the range moves into W
    quantize: bool = True  # false: smoothing only, a later stage quantizes
    act_static: bool = False  # per-tensor static activation scales from calibration (else dynamic)
    fold_into_linears: bool = False  # also smooth v -> o and up -> down

    _alpha = field_validator("alpha")(number_in(0.0, 1.0))

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_depend(cls, data: Any) -> Any:
        # defaults that follow other options, filled in as values so that a stage dumped and read
        # back (a study hands its workers Recipe.to_dict) validates the same: a smoothing-only stage
        # has no activation bits; static scales are per tensor
        if isinstance(data, dict):
            data = dict(data)
            if "abits" not in data:
                data["abits"] = 8 if _as_bool(data.get("quantize", True)) is not False else KEEP_BITS
            if _as_bool(data.get("act_static", False)) and "act_per_token" not in data:
                data["act_per_token"] = False
        return data

    @model_validator(mode="after")
    def _static(self) -> SmoothQuantConfig:
        if self.act_static and self.act_per_token:
            raise ValueError("act_static uses one per-tensor scale: act_per_token must be false")
        if not self.quantize and (self.act_static or self.abits != KEEP_BITS):
            raise ValueError(
                "abits/act_static: a smoothing-only stage (quantize: false) quantizes nothing; "
                "set abits on the stage that quantizes"
            )
        return self


def _as_bool(value: Any) -> bool | None:
    """A raw option as the bool field will read it (pydantic's lax rules: "false", 0, "no", ...);
    None when it is no bool at all (the field's own validation then names it)."""
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return None


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); channels never active (or all-zero weights)
    keep s = 1 so nothing is divided by zero."""
    x = x_absmax.float().clamp_min(1e-5)
    w = w_absmax.float().clamp_min(1e-5)
    s = x.pow(alpha) / w.pow(1 - alpha)
    dead = (x_absmax <= 0) | (w_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(1e-5, 1e5)


def static_act_scale(absmax: float, bits: int) -> float:
    """Per-tensor symmetric scale covering the calibrated range [-absmax, absmax]."""
    a = torch.tensor([max(absmax, 1e-8)])
    scale, _ = qparams_from_range(-a, a, bits, True)
    return float(scale)


@register("smoothquant")
class SmoothQuant(Method):
    """Smoothing into norms, then W8A8 RTN with activation fake-quant (or smoothing only)."""

    Config = SmoothQuantConfig
    config: SmoothQuantConfig

    def process_block(self, ctx: BlockContext) -> None:
        c = self.config
        names, plans = block_plans(ctx, c)
        if not plans:
            return
        modules, resolved = block_mappings(ctx.block, ctx.arch.smooth)
        mappings = [
            r
            for r in resolved
            if r.skipped is None
            and (c.fold_into_linears or not isinstance(r.prev, torch.nn.Linear))
            and any(n in plans for n in r.into)
        ]
        rep = representatives(names, mappings)
        need = {r.into[0] for r in mappings}
        if c.quantize and c.act_static:
            need |= {rep[n] for n, p in plans.items() if p.act is not None}
        stats = collect_input_stats(ctx, sorted(need), with_h=False)

        info: dict[str, dict] = {n: {} for n in plans}
        for r in mappings:
            st = stats[r.into[0]]
            lins = [ctx.linear(n) for n in r.into]
            w_absmax = torch.stack([lin.weight.detach().float().abs().amax(dim=0) for lin in lins]).amax(dim=0)
            s = smoothing_scales(st.absmax, w_absmax, c.alpha)
            fold_scale(r.prev, lins, s)
            st.divide_channels(s)
            for n in r.into:
                if n in info:
                    info[n].update(smooth_scale_max=float(s.max()), smooth_scale_min=float(s.min()))

        for n, plan in plans.items():
            if not c.quantize:
                ctx.note(n, **info[n])
                continue
            result = None
            if plan.weight is not None:
                W = ctx.linear(n).weight.detach().float()
                qw = quantize_weight(W, plan.weight)
                Wq = qw.dequantize()
                info[n]["weight_rel_err"] = float((Wq - W).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))
                result = SolveResult(Wq, qw, info[n])
            act_scale = None
            if plan.act is not None and c.act_static:
                act_scale = static_act_scale(float(stats[rep[n]].absmax.max()), plan.act.bits)
            ctx.commit(n, result, plan, act_scale=act_scale)
