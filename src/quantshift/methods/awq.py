"""AWQ (Lin et al., arXiv 2306.00978): activation-aware per-input-channel weight scaling.

For each smoothing mapping of the ArchSpec (norm -> q,k,v; v -> o when shapes allow; norm ->
gate,up; up -> down) the input channels of the linears are scaled by s = mean|x|^alpha, with
alpha on a grid in [0, 1], and 1/s is folded into the op producing their input. alpha is chosen
by the output MSE with the weights fake-quantized:

- objective "layer" (default): the mapping's own output, sum over its linears of
  ||X W^T - (X/s) Q(W s)^T||^2, evaluated exactly over every calibration token through the
  input second moment H (tr(D H D^T) with D = W - Q(W s)/s), so no activations are stored;
- objective "block": the decoder block's output, running the block with the mapping's linears
  fake-quantized (more faithful to cross-linear effects, ~grid x batches block passes per mapping).

Then a clipping search shrinks each group's range by a ratio in [1 - max_shrink, 1], chosen per
(row, group) by that group's share of the output error, and the weights are rounded to nearest.

With `quantize: false` the stage is a transform only: it leaves the scaled and clipped weights in
floating point for a later stage (e.g. GPTQ) to quantize; its wbits/group_size still define the
format the search optimizes for, so give it the same format as the quantizing stage.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator, model_validator

from ..config import KEEP_BITS, number_in
from ..quant.primitives import QuantSpec, _grouped, fake_quantize_weight, qparams_from_range, quantize_weight
from ..quant.smoothing import (
    InputStats,
    ResolvedMapping,
    block_mappings,
    collect_input_stats,
    fold_scale,
    output_error,
    representatives,
)
from .base import BlockContext, LinearPlan, Method, SolveResult, StageConfig, block_plans, register


class AWQConfig(StageConfig):
    quantize: bool = True  # false: transform only (scale + clip), a later stage quantizes
    grid: int = 20  # alpha candidates, evenly spaced in [0, 1] (alpha = 0 is plain RTN)
    objective: Literal["layer", "block"] = "layer"
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5  # smallest range kept by clipping is (1 - max_shrink) of the max

    _grids = field_validator("grid", "clip_grid")(number_in(2, 1000))  # grid points of each search

    @field_validator("max_shrink")
    @classmethod
    def _shrink(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("max_shrink must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _transform_only(self) -> AWQConfig:
        if not self.quantize and self.abits != KEEP_BITS:
            raise ValueError(
                "abits: a transform-only awq stage (quantize: false) quantizes nothing; "
                "set abits on the stage that quantizes"
            )
        return self


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalized to geometric mean 1 (quantization is scale invariant per
    group, so only the ratios matter; normalizing keeps folded norm weights well conditioned)."""
    s = x_mean.float().clamp_min(1e-8).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(1e-4, 1e4)


def scaled_fake_quant(W: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The effective weight seen by the unscaled input: Q(W diag(s)) diag(1/s)."""
    return fake_quantize_weight(W.float() * s[None, :], spec) / s[None, :]


def search_scale_layer(
    weights: list[torch.Tensor], specs: list[QuantSpec], x_mean: torch.Tensor, H: torch.Tensor, grid: int
) -> tuple[torch.Tensor, float, list[float]]:
    """Best s over the alpha grid by the mapping's output error (exact, through H)."""
    # linears of one format are stacked by rows: one error GEMM per format and alpha
    stacks: list[tuple[QuantSpec, list[torch.Tensor]]] = []
    for W, sp in zip(weights, specs):
        same = next((ws for s0, ws in stacks if s0 == sp), None)
        if same is None:
            stacks.append((sp, [W.float()]))
        else:
            same.append(W.float())
    stacked = [(torch.cat(ws), sp) for sp, ws in stacks]
    errs = []
    best = (float("inf"), 0.0, torch.ones_like(x_mean))
    for alpha in torch.linspace(0, 1, grid).tolist():
        s = awq_scales(x_mean, alpha)
        err = sum(float(output_error(W, scaled_fake_quant(W, s, sp), H)) for W, sp in stacked)
        errs.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errs


def clip_search(
    W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp each (row, group) of W to a shrunk range r * [min, max], r chosen from a grid in
    [1 - max_shrink, 1] by that group's output error d^T H_gg d (H_gg: the group's diagonal block
    of H). Returns the clamped weight and the chosen ratios [out, ngroups]."""
    W = W.float()
    out_f, in_f = W.shape
    if spec.group_size == 0 or max_shrink == 0:  # one range for the whole tensor: nothing per group
        return W.clone(), torch.ones(1, 1)
    gs = spec.group_size if spec.group_size > 0 else in_f
    Wg = _grouped(W, gs)  # [out, ng, gs]
    ng = Wg.shape[1]
    pad = ng * gs - in_f
    Hp = torch.nn.functional.pad(H.float(), (0, pad, 0, pad))
    Hb = torch.stack([Hp[g * gs : (g + 1) * gs, g * gs : (g + 1) * gs] for g in range(ng)])  # [ng, gs, gs]
    lo, hi = Wg.amin(dim=2, keepdim=True), Wg.amax(dim=2, keepdim=True)
    best_err = torch.full((out_f, ng), float("inf"), device=W.device)
    best_r = torch.ones(out_f, ng, device=W.device)
    maxq = spec.maxq
    for r in torch.linspace(1.0, 1.0 - max_shrink, grid).tolist():
        # the clamped group's range is exactly [lo r, hi r] (ranges always contain 0), so its
        # qparams come straight from it and the group is quantized in place, no regrouping
        lo_r, hi_r = lo * r, hi * r
        scale, zero = qparams_from_range(lo_r, hi_r, spec.bits, spec.symmetric)
        Wc = torch.minimum(torch.maximum(Wg, lo_r), hi_r)
        D = Wg - (torch.clamp(torch.round(Wc / scale) + zero, 0, maxq) - zero) * scale
        Dg = D.transpose(0, 1)  # [ng, out, gs]: one batched matmul per group
        err = (torch.bmm(Dg, Hb) * Dg).sum(dim=2).t()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    Wc = torch.minimum(torch.maximum(Wg, lo * best_r[..., None]), hi * best_r[..., None])
    return Wc.reshape(out_f, -1)[:, :in_f].contiguous(), best_r


@register("awq")
class AWQ(Method):
    """Activation-aware weight scaling, clipping search, then RTN (or transform only)."""

    Config = AWQConfig
    config: AWQConfig

    def _search_spec(self, plan: LinearPlan | None) -> QuantSpec | None:
        return plan.weight if plan is not None else None

    def process_block(self, ctx: BlockContext) -> None:
        c = self.config
        names, plans = block_plans(ctx, c)
        if not plans:
            return
        modules, resolved = block_mappings(ctx.block, ctx.arch.smooth)
        mappings = [r for r in resolved if any(self._search_spec(plans.get(n)) is not None for n in r.into)]
        rep = representatives(names, [r for r in mappings if r.skipped is None])
        observed = sorted({rep[n] for n in plans} | {r.into[0] for r in mappings if r.skipped is None})
        stats: dict[str, InputStats] = collect_input_stats(ctx, observed, with_h=True)

        block_ref = None
        if c.objective == "block" and any(r.skipped is None for r in mappings):
            with torch.no_grad():
                block_ref = [ctx.run_block(i) for i in range(ctx.num_batches)]

        info: dict[str, dict] = {n: {} for n in plans}
        for r in mappings:
            if r.skipped is not None:
                for n in r.into:
                    if n in info:
                        info[n]["awq_skipped"] = r.skipped
                continue
            st = stats[r.into[0]]
            assert st.H is not None  # collected with_h
            lins = [ctx.linear(n) for n in r.into]
            specs = [self._search_spec(plans.get(n)) for n in r.into]
            q = [(lin.weight.detach().float(), sp) for lin, sp in zip(lins, specs) if sp is not None]
            if block_ref is None:
                s, alpha, errs = search_scale_layer([w for w, _ in q], [sp for _, sp in q], st.absmean, st.H, c.grid)
            else:
                s, alpha, errs = self._search_scale_block(ctx, r, specs, st.absmean, block_ref)
            fold_scale(r.prev, lins, s)
            st.divide_channels(s)
            for n in r.into:
                if n in info:
                    info[n].update(awq_alpha=alpha, awq_err_gain=errs[0] / max(min(errs), 1e-30))

        for n, plan in plans.items():
            lin = ctx.linear(n)
            W = lin.weight.detach().float()
            H = stats[rep[n]].H
            assert H is not None  # collected with_h
            if plan.weight is None:  # only activations to quantize (e.g. wbits 16, abits 8)
                if c.quantize:
                    ctx.commit(n, None, plan)
                continue
            Wc = W
            if c.clip:
                Wc, ratios = clip_search(W, H, plan.weight, c.clip_grid, c.max_shrink)
                info[n]["clip_ratio_mean"] = float(ratios.float().mean())
            if c.quantize:
                qw = quantize_weight(Wc, plan.weight)
                Wq = qw.dequantize()
                den = float((W @ H * W).sum().clamp_min(1e-30))
                info[n]["out_rel_err"] = float(output_error(W, Wq, H)) / den
                ctx.commit(n, SolveResult(Wq, qw, info[n]), plan)
            else:
                with torch.no_grad():
                    lin.weight.copy_(Wc.to(lin.weight.dtype))
                ctx.note(n, **info[n])

    def _search_scale_block(
        self,
        ctx: BlockContext,
        r: ResolvedMapping,
        specs: list[QuantSpec | None],
        x_mean: torch.Tensor,
        ref: list[torch.Tensor],
    ) -> tuple[torch.Tensor, float, list[float]]:
        """Best s by the block output MSE: the mapping's linears temporarily hold Q(W s)/s, which
        on the unscaled input equals the scaled-and-folded quantized block."""
        lins = [ctx.linear(n) for n in r.into]
        originals = [lin.weight.detach().clone() for lin in lins]
        errs: list[float] = []
        best = (float("inf"), 0.0, torch.ones_like(x_mean))
        try:
            for alpha in torch.linspace(0, 1, self.config.grid).tolist():
                s = awq_scales(x_mean, alpha)
                with torch.no_grad():
                    for lin, W, sp in zip(lins, originals, specs):
                        if sp is not None:
                            lin.weight.copy_(scaled_fake_quant(W, s, sp).to(W.dtype))
                    err = sum(
                        float((ctx.run_block(i).float() - ref[i].float()).pow(2).mean()) for i in range(ctx.num_batches)
                    )
                errs.append(err)
                if err < best[0]:
                    best = (err, alpha, s)
        finally:
            with torch.no_grad():
                for lin, W in zip(lins, originals):
                    lin.weight.copy_(W)
        return best[2], best[1], errs
