"""GPTQ (Frantar et al., arXiv 2210.17323): column-by-column rounding with Hessian error feedback.

H = 2/N sum x x^T over calibration inputs; 1% of mean diag H added as damping; the upper
Cholesky factor of H^-1 drives the updates; columns are processed in lazy blocks; act-order
visits columns by descending diag H, with static groups (qparams fixed before any update) as an
option. The solver is a pure function of (W, H, spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from pydantic import field_validator

from ..config import number_in
from ..quant.primitives import (
    QuantizedWeight,
    QuantSpec,
    damped_inverse_cholesky,
    expand_to_columns,
    gram,
    qparams_from_range,
    quantize_weight,
    weight_qparams,
)
from .base import LinearMethod, LinearPlan, SolveResult, StageConfig, register

# the GPTQ family's own numbers, used by GPTQ, SpQR and QuIP configs
check_damp = number_in(
    0.0, 1e3, note=" (a fraction of the mean Hessian diagonal; 0 is allowed, the solvers raise it stepwise)"
)
check_block_size = number_in(1, 1 << 16)


class GPTQConfig(StageConfig):
    damp: float = 0.01
    block_size: int = 128
    # columns by descending Hessian diagonal with group params fixed up front: the widely used
    # tools' default for group-wise GPTQ, and 25-30% lower W3 perplexity than the paper's order
    # on smollm2-135m (docs/results.md, docs/results/precision-and-defaults.jsonl); with static groups
    # every group is still a run of consecutive columns, so exports stay plain g<N> GPTQ
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True

    _damp = field_validator("damp")(check_damp)
    _block_size = field_validator("block_size")(check_block_size)


@dataclass
class HessianStats:
    H: torch.Tensor
    tokens: int = 0


def accumulate_hessian(stats: HessianStats, x: torch.Tensor) -> None:
    """Running mean of 2 x x^T over tokens (x: [tokens, in])."""
    n = x.shape[0]
    total = stats.tokens + n
    stats.H.mul_(stats.tokens / total)
    stats.H.add_(gram(x), alpha=2.0 / total)
    stats.tokens = total


def _row_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return qparams_from_range(x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True), spec.bits, spec.symmetric)


@dataclass
class GPTQSolution:
    weight: torch.Tensor  # fake-quantized W [out, in]
    qweight: QuantizedWeight
    row_losses: torch.Tensor  # proxy loss of each output row (NaN after the RTN fallback)
    damp: float  # relative damping the Hessian needed (the largest tried when it fell back)
    damp_steps: int = 0  # how many times the configured damping was raised
    fallback: str | None = None  # "rtn": no damping up to the cap made H positive definite

    def numerics(self) -> dict:
        """What the factorization needed, for the per-layer report."""
        return {"damp": self.damp, "damp_steps": self.damp_steps, "fallback": self.fallback}


def gptq_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> tuple[torch.Tensor, QuantizedWeight, float]:
    """Quantize W [out, in] given H [in, in]. Returns (W_q, codes+qparams, proxy loss); the loss
    is NaN when H could not be factored and W was rounded to nearest (see gptq_solve_rows)."""
    sol = gptq_solve_rows(W, H, spec, damp, block_size, act_order, static_groups)
    return sol.weight, sol.qweight, float(sol.row_losses.sum())


def rtn_fallback(W: torch.Tensor, spec: QuantSpec, damp: float, steps: int) -> GPTQSolution:
    """Round to nearest on the same grid: what a linear gets when its Hessian cannot be factored."""
    qw = quantize_weight(W.detach().float(), spec)
    nan = torch.full((W.shape[0],), float("nan"), device=W.device)
    return GPTQSolution(qw.dequantize(), qw, nan, damp, steps, "rtn")


def gptq_solve_rows(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQSolution:
    """GPTQ with the proxy loss of each output row (rows are solved independently). When no
    damping up to primitives.DAMP_CAP makes H positive definite, W is rounded to nearest."""
    W_in = W
    H = H.detach().float()  # read, never written: the factorization works on its own copy
    out_f, in_f = W.shape
    gs = spec.group_size if spec.group_size > 0 else 0
    maxq = spec.maxq

    # dead channels (never active) get 1 on H's diagonal and 0 in W
    dead = torch.diag(H) == 0
    if act_order:
        diag = torch.diag(H)
        diag[dead] = 1
        perm = torch.argsort(diag, descending=True)
    else:
        perm = torch.arange(in_f, device=W.device)
    inv_perm = torch.argsort(perm)
    # The column loop works on W^T so a column is a contiguous row and the update touches
    # contiguous memory (~3x faster on a CPU); W^T's rows are gathered in visiting order directly
    # from the caller's W, the only copy of it the solver makes
    Wt = torch.index_select(W.detach().t(), 0, perm).float().contiguous()
    Wt[dead[perm]] = 0

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if gs and static_groups:
        static = [_row_params(Wt[inv_perm[s : s + gs]].t(), spec) for s in range(0, in_f, gs)]
    if not gs:  # per-channel or per-tensor: one set of params from the whole matrix
        full_scale, full_zero = weight_qparams(Wt.t(), spec)

    fac = damped_inverse_cholesky(H, damp, order=perm)
    if fac.factor is None:
        return rtn_fallback(W_in, spec, fac.damp, fac.steps)
    Hinv = fac.factor

    # blocks are whole groups, so group params always see fully updated columns
    B = block_size if not gs else max(gs, block_size - block_size % gs)
    losses = torch.zeros(out_f, device=W.device)
    n_groups = 1 if not gs else -(-in_f // gs)
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)
    if gs and static_groups:
        for g, (s, z) in enumerate(static):
            scales[:, g : g + 1], zeros[:, g : g + 1] = s, z
        g_idx = perm // gs  # group of each visited column, in visiting order
    else:
        g_idx = torch.arange(in_f, device=W.device) // max(gs, 1) if gs else torch.zeros_like(perm)
    if not gs:
        scales, zeros = full_scale.expand(out_f, 1).clone(), full_zero.expand(out_f, 1).clone()
    scale, zero = scales[:, 0].clone(), zeros[:, 0].clone()
    visit_groups = g_idx.tolist()
    if gs and static_groups:  # per-group params, fixed up front, one contiguous row per group
        scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()

    # The column loop is the hot path: one iteration per input column, three ops each
    # (fake-quant, residual, rank-1 update), which on a GPU are launch-bound. It carries
    # unscaled residuals w - q with the rows of Hinv pre-divided by their diagonal, which is the
    # paper's (w - q) / d update with one op less per column.
    Qt = torch.empty_like(Wt)
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        n = i2 - i1
        W1 = Wt[i1:i2]  # a view: updates land in Wt
        R1 = torch.empty_like(W1)
        d = Hinv[i1:i2, i1:i2].diagonal()
        Hs = Hinv[i1:i2, i1:] / d[:, None]
        qs = []
        for i in range(n):
            col = i1 + i
            if gs:
                if static_groups:
                    g = visit_groups[col]
                    scale, zero = scales_t[g], zeros_t[g]
                elif col % gs == 0:
                    g = col // gs
                    sc, z = _row_params(W1[i : i + gs].t(), spec)
                    scales[:, g : g + 1], zeros[:, g : g + 1] = sc, z
                    scale, zero = sc.flatten(), z.flatten()
            # q = scale * (clamp(round(w / scale) + zero, 0, maxq) - zero) in one op; a float
            # zero point (integer-valued) because with int32 ones torch range-checks them on
            # every call, a device-to-host sync per column on a GPU
            w, r = W1[i], R1[i]
            q = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, 0, maxq)
            torch.sub(w, q, out=r)
            W1[i + 1 :].addr_(Hs[i, i + 1 : n], r, alpha=-1)
            qs.append(q)
        Qt[i1:i2] = torch.stack(qs)
        losses += (R1 / d[:, None]).pow(2).sum(dim=0) / 2
        Wt[i2:] -= Hs[:, n:].t() @ R1
    del Wt, Hinv
    Q = Qt.t()[:, inv_perm]
    del Qt

    g_idx = g_idx[inv_perm]
    sequential_groups = not gs or torch.equal(g_idx, torch.arange(in_f, device=Q.device) // gs)
    qw_g_idx = None if sequential_groups else g_idx
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=Q.device)
    band = max(1, 2**22 // max(in_f, 1))  # rows at a time: the per-column params are never whole
    for first in range(0, out_f, band):
        rows = slice(first, first + band)
        if gs:
            col_s, col_z = scales[rows][:, g_idx], zeros[rows][:, g_idx]
        else:
            col_s, col_z = expand_to_columns(scales[rows], in_f, -1), expand_to_columns(zeros[rows], in_f, -1)
        codes[rows] = torch.clamp(torch.round(Q[rows] / col_s) + col_z, 0, maxq)
    qw = QuantizedWeight(codes, scales, zeros, spec, qw_g_idx)
    return GPTQSolution(Q, qw, losses, fac.damp, fac.steps)


def hessian_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error tr(dW H dW^T) / tr(W H W^T) on the calibration inputs, a band of
    rows at a time (W and dW stacked into one product), so no temporary is as large as W."""
    H = H.float()
    sums = torch.zeros(2, dtype=torch.float64, device=H.device)
    band = max(1, 2**23 // max(H.shape[0], 1))
    for r in range(0, W.shape[0], band):
        w = W[r : r + band].float()
        both = torch.stack([Wq[r : r + band].float() - w, w])  # [2, rows, in]: dW, then W
        sums += ((both @ H) * both).sum(dim=(1, 2), dtype=torch.float64)
    return float(sums[0] / sums[1].clamp_min(1e-30))


class HessianMethod(LinearMethod):
    """A per-linear solver whose statistics are the input Hessian 2/N sum x x^T (GPTQ family)."""

    stats_cacheable = True

    def stats_to_cache(self, stats: HessianStats) -> tuple[torch.Tensor, int]:
        return stats.H, stats.tokens

    def stats_from_cache(self, tensor: torch.Tensor, tokens: int, device: torch.device) -> HessianStats:
        return HessianStats(tensor.to(device=device, dtype=torch.float32), tokens)

    def new_stats(self, linear: nn.Linear) -> HessianStats:
        n = linear.in_features
        return HessianStats(torch.zeros(n, n, device=linear.weight.device, dtype=torch.float32))

    def add_batch(self, stats: HessianStats, x: torch.Tensor) -> None:
        accumulate_hessian(stats, x)


@register("gptq")
class GPTQ(HessianMethod):
    Config = GPTQConfig
    config: GPTQConfig

    def solve(self, name: str, linear: nn.Linear, stats: HessianStats, plan: LinearPlan) -> SolveResult:
        assert plan.weight is not None
        c = self.config
        W = linear.weight.detach().float()
        sol = gptq_solve_rows(W, stats.H, plan.weight, c.damp, c.block_size, c.act_order, c.static_groups)
        return SolveResult(sol.weight, sol.qweight, _info(W, sol, sol.row_losses, stats.H))

    def solve_shared(
        self, names: list[str], linears: list[nn.Linear], stats: HessianStats, plan: LinearPlan
    ) -> list[SolveResult]:
        """Linears fed the same input (q/k/v, gate/up) are one GPTQ problem stacked by rows: each
        row is solved independently given H, so this is exact and runs the column loop once.
        Per-tensor grids couple rows, so they are solved one linear at a time."""
        assert plan.weight is not None
        if len(linears) == 1 or plan.weight.group_size == 0:
            return super().solve_shared(names, linears, stats, plan)
        c = self.config
        weights = [lin.weight.detach().float() for lin in linears]
        sol = gptq_solve_rows(
            torch.cat(weights), stats.H, plan.weight, c.damp, c.block_size, c.act_order, c.static_groups
        )
        Q, qw = sol.weight, sol.qweight
        results, r0 = [], 0
        for W in weights:
            rows = slice(r0, r0 + W.shape[0])
            r0 = rows.stop
            # clones: saved tensors must not share storage
            part = QuantizedWeight(
                qw.codes[rows].clone(), qw.scale[rows].clone(), qw.zero[rows].clone(), qw.spec, qw.g_idx
            )
            results.append(SolveResult(Q[rows].clone(), part, _info(W, sol, sol.row_losses[rows], stats.H, Q[rows])))
        return results


def _info(
    W: torch.Tensor, sol: GPTQSolution, row_losses: torch.Tensor, H: torch.Tensor, Q: torch.Tensor | None = None
) -> dict:
    """The per-layer report of one GPTQ-solved linear (Q: its rows of a stacked solution)."""
    Q = sol.weight if Q is None else Q
    info = {"out_rel_err": hessian_error(W, Q, H), **sol.numerics()}
    if sol.fallback is None:  # after the RTN fallback there is no GPTQ proxy loss
        info["gptq_loss"] = float(row_losses.sum())
    return info
