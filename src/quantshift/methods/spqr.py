"""SpQR (Dettmers et al., arXiv 2306.03078): small groups, quantized statistics, sparse outliers.

What this implementation does, per linear (W [out, in], H from calibration inputs as in GPTQ):

1. GPTQ-style column pass with error feedback (the Hessian machinery of gptq.py: the same H,
   damping and upper Cholesky factor of H^-1), optionally in act-order.
2. First-level statistics: one (scale, zero) per output row for every group of `group_size`
   (default 16) consecutive input columns, fitted by min-max when the pass reaches the group,
   leaving out weights whose removal alone would cut the group's sensitivity-weighted error by
   more than the outlier threshold (the paper's leave-one-out test).
3. Second-level statistics: the column of first-level scales (and of zeros) of a group is
   itself quantized to `qq_bits` (default 3) in runs of `qq_group_size` (default 16) output
   rows, each run with an fp16 minimum and fp16 step. Weights are rounded on the grid the
   *quantized* statistics define, so what is stored is what is counted.
4. Outliers: a weight whose sensitivity ((w - q) / [chol H^-1]_jj)^2 exceeds
   `outlier_threshold` x (the layer's typical sensitivity, mean_j var_i(W_ij) / [chol H^-1]_jj^2)
   keeps its (error-updated) value, rounded to fp16, and stops feeding error forward. The number
   of outliers is capped by `max_outlier_fraction` (and by `max_bits_per_param` when set); a
   column may take at most 8x its fair share of the budget still left, so the first columns
   of the pass cannot spend all of it.

Off the CPU the column pass never reads a value back to the host: the budget still left is a
device tensor and each selection (the weights over the threshold with the highest sensitivities,
up to the share allowed) is a mask, so a GPU runs the loop without a synchronisation per column.
On a CPU, where a read costs nothing, the same selections are made by index, which skips the
outlier bookkeeping of the many columns that have none (the masks cost 15-25% more solver time
there). Both give exactly the weights, codes and outliers of the loop that read every column's
outliers back (tests/test_spqr_quip.py keeps it as the reference and runs both ways).

Storage: codes + the dequantized (already 3-bit-grid) first-level scales/zeros as a
QuantizedWeight, plus outliers as flat indices (int32) and fp16 values; checkpoint.py writes
them as `<name>.outlier_idx` / `<name>.outlier_values` and reload reproduces the weights exactly.

Bits per parameter (counted as the paper does): wbits per code, qq_bits per first-level scale
and zero, 2 x (16-bit min + 16-bit step) per second-level run, 32 bits per outlier (16-bit
value + 16-bit index). With w3, g16, qq3, qq16 that is 3.625 bits before outliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from pydantic import field_validator, model_validator

from ..config import number_in
from ..errors import ConfigError
from ..quant.primitives import QuantizedWeight, QuantSpec, damped_inverse_cholesky, qparams_from_range
from .base import LinearPlan, SolveResult, StageConfig, overrides_obey, register
from .gptq import HessianMethod, HessianStats, check_block_size, check_damp, hessian_error

OUTLIER_BITS = 32  # 16-bit value + 16-bit column index, as the paper counts CSR storage
SECOND_LEVEL_BITS = 32  # fp16 minimum + fp16 step per second-level run


def spqr_groups_rule(v: int, where: str = "") -> int:
    if v <= 0:
        raise ValueError(f"{where}SpQR needs small groups (group_size > 0), got {v}")
    return v


class SpQRConfig(StageConfig):
    wbits: int = 3
    group_size: int = 16
    qq_bits: int = 3
    qq_group_size: int = 16
    outlier_threshold: float = 0.2  # relative to the layer's typical sensitivity; inf = none
    max_outlier_fraction: float = 0.01
    max_bits_per_param: float | None = None  # hard budget; tightens the outlier cap
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    true_sequential: bool = True

    _damp = field_validator("damp")(check_damp)
    _block_size = field_validator("block_size")(check_block_size)
    _qq_group_size = field_validator("qq_group_size")(number_in(1, 1 << 16))
    _max_bits = field_validator("max_bits_per_param")(number_in(0.0, 64.0, lo_open=True))

    @field_validator("group_size")
    @classmethod
    def _gs(cls, v: int) -> int:
        return spqr_groups_rule(v)

    @model_validator(mode="after")
    def _override_groups(self) -> SpQRConfig:
        overrides_obey(self.overrides, "group_size", spqr_groups_rule)
        return self

    @field_validator("qq_bits")
    @classmethod
    def _qq_bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"qq_bits must be 2..8, got {v}")
        return v

    @field_validator("outlier_threshold")
    @classmethod
    def _thr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"outlier_threshold must be > 0 (inf disables outliers), got {v}")
        return v

    @field_validator("max_outlier_fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"max_outlier_fraction must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _budget(self) -> SpQRConfig:
        if self.max_bits_per_param is not None and self.wbits != 16:
            base = nominal_bits(self.wbits, self.group_size, self.qq_bits, self.qq_group_size, self.sym)
            if self.max_bits_per_param < base:
                raise ValueError(
                    f"max_bits_per_param={self.max_bits_per_param} is below the {base:.3f} bits the "
                    f"codes and statistics alone take (wbits={self.wbits}, group_size={self.group_size}, "
                    f"qq_bits={self.qq_bits}, qq_group_size={self.qq_group_size})"
                )
        return self


# --- pure math -------------------------------------------------------------------------------


def nominal_bits(wbits: int, gs: int, qq_bits: int, qq_gs: int, sym: bool = False) -> float:
    """Bits per parameter of codes + statistics for a large layer (no partial groups, no outliers).
    A symmetric grid has a fixed zero point, so only its scales are stored."""
    n_stats = 1 if sym else 2
    return wbits + n_stats * (qq_bits / gs + SECOND_LEVEL_BITS / (gs * qq_gs))


def bits_used(
    out_f: int, in_f: int, wbits: int, gs: int, qq_bits: int, qq_gs: int, n_outliers: int, sym: bool = False
) -> dict:
    """Exact storage of one layer, counted as in the paper (partial groups counted whole)."""
    n_stats = 1 if sym else 2  # scales (and zeros)
    n_groups = math.ceil(in_f / gs)
    first = out_f * n_groups  # first-level statistics per kind
    second = math.ceil(out_f / qq_gs) * n_groups  # second-level runs per kind
    parts = {
        "codes": out_f * in_f * wbits,
        "first_level_stats": n_stats * first * qq_bits,
        "second_level_stats": n_stats * second * SECOND_LEVEL_BITS,
        "outliers": OUTLIER_BITS * n_outliers,
    }
    total = sum(parts.values())
    return {"bits": total, "params": out_f * in_f, "avg_bits": total / (out_f * in_f), **parts}


def quantize_stat(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Second-level quantization of a statistics vector v [n]: runs of `group` entries, each
    min-max rounded to `bits` with an fp16 minimum and fp16 step. Returns the dequantized v."""
    n = v.numel()
    pad = (-n) % group
    x = torch.nn.functional.pad(v.float(), (0, pad), value=float("nan")).reshape(-1, group)
    lo = torch.nan_to_num(x, nan=float("inf")).amin(1, keepdim=True)
    hi = torch.nan_to_num(x, nan=float("-inf")).amax(1, keepdim=True)
    lo = lo.half().float()
    step = ((hi - lo) / (2**bits - 1)).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((x - lo) / step), 0, 2**bits - 1)
    return (lo + q * step).reshape(-1)[:n]


def masked_minmax_params(
    w: torch.Tensor, keep: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) from the min/max of the kept weights of w [out, g] (range holds 0;
    zero may be fractional, as second-level quantization leaves it)."""
    kept = torch.where(keep, w, torch.zeros_like(w))
    return qparams_from_range(kept.amin(1), kept.amax(1), bits, sym)


def round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest code for a possibly fractional zero: argmin |w - scale*(c - zero)| over c in [0, maxq]."""
    return torch.clamp(torch.round(w / scale + zero), 0, maxq)


def leave_one_out_gain(w: torch.Tensor, d: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """For each weight k of w [out, g]: how much the error sum_{j != k} ((w_j - q_j) / d_j)^2 of
    the *other* weights of its group drops when k is left out of the min-max fit. This finds the
    weights that spoil the range; counting k's own error too would also flag every weight of a
    row whose range is already spoilt."""
    out_f, g = w.shape
    maxq = 2**bits - 1

    def err(x: torch.Tensor, keep: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:  # x [..., k]
        s, z = masked_minmax_params(x.reshape(-1, x.shape[-1]), keep.reshape(-1, x.shape[-1]), bits, sym)
        s, z = s.reshape(x.shape[:-1] + (1,)), z.reshape(x.shape[:-1] + (1,))
        q = s * (round_codes(x, s, z, maxq) - z)
        return ((x - q) / dd) ** 2 * keep

    each = err(w, torch.ones_like(w, dtype=torch.bool), d)  # [out, g]
    others_full = each.sum(1, keepdim=True) - each  # [out, g]: error of the rest, k in the fit
    others = torch.ones(g, g, dtype=torch.bool, device=w.device)
    others.fill_diagonal_(False)
    loo = w.unsqueeze(1).expand(out_f, g, g)  # [out, left-out k, column j]
    loo_err = err(loo, others.expand(out_f, g, g), d).sum(-1)  # [out, g]
    return others_full - loo_err


def _share(remaining: int, cols: int, cols_left: int) -> int:
    """Outliers `cols` columns may take: at most 8x their fair share of the budget still left."""
    return min(remaining, math.ceil(remaining * min(1.0, 8.0 * cols / cols_left)))


def _top_by_index(score: torch.Tensor, mask: torch.Tensor, cap: int) -> torch.Tensor:
    """Indices of the entries of `mask` with the `cap` highest scores (all when no more than cap)."""
    cand = torch.nonzero(mask.flatten()).flatten()
    if cand.numel() > cap:
        cand = cand[torch.topk(score.flatten()[cand], cap).indices]
    return cand


class _Budget:
    """The outliers still allowed, on the device; `take` selects by masks and spends."""

    def __init__(self, budget: int, device: torch.device) -> None:
        self.budget = budget
        self.remaining = torch.tensor(budget, dtype=torch.int64, device=device)

    def take(self, score: torch.Tensor, mask: torch.Tensor, cols: int, cols_left: int) -> torch.Tensor:
        picked = top_within(score, mask, share(self.remaining, cols, cols_left), _share(self.budget, cols, cols_left))
        self.remaining = self.remaining - picked.sum()
        return picked


def share(remaining: torch.Tensor, cols: int, cols_left: int) -> torch.Tensor:
    """_share with the budget left as a 0-d int64 tensor, computed where it lives (the same
    float64 product and ceiling as Python's)."""
    frac = min(1.0, 8.0 * cols / cols_left)
    if frac == 1.0:
        return remaining
    return torch.minimum(remaining, torch.ceil(remaining.double() * frac).long())


def top_within(score: torch.Tensor, mask: torch.Tensor, cap: torch.Tensor, limit: int) -> torch.Tensor:
    """The entries of `mask` with the `cap` highest scores (all of them when there are no more
    than `cap`), as a mask, without reading anything back to the host. `limit`: a bound on `cap`
    known on the host (the share of the whole budget), so only that many candidates are ranked."""
    masked = torch.where(mask, score, float("-inf"))
    k = min(limit, score.numel())
    picked = torch.zeros_like(mask)
    if k == 0:
        return picked
    _, idx = torch.topk(masked, k, sorted=True)
    rank = torch.arange(k, device=score.device)
    picked[idx] = (rank < cap) & mask[idx]
    return picked


@dataclass
class SpQRSolution:
    weight: torch.Tensor  # final fake-quant weight [out, in] (codes on the grid, outliers exact)
    qweight: SparseQuantizedWeight
    loss: float
    n_outliers: int
    threshold: float  # absolute sensitivity threshold used
    damp: float = 0.0  # relative damping the Hessian needed (the largest tried when it fell back)
    damp_steps: int = 0  # how many times the configured damping was raised
    fallback: str | None = None  # "rtn": H could not be factored; rounded to nearest on SpQR's grid

    def numerics(self) -> dict:
        return {"damp": self.damp, "damp_steps": self.damp_steps, "fallback": self.fallback}


@dataclass
class SparseQuantizedWeight(QuantizedWeight):
    """Codes + quantized statistics, plus a sparse set of weights kept in 16-bit."""

    outlier_idx: torch.Tensor | None = None  # [n] int32 flat indices row * in + col
    outlier_values: torch.Tensor | None = None  # [n] float16

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = super().dequantize(torch.float32)
        if self.outlier_idx is not None and self.outlier_values is not None and self.outlier_idx.numel():
            w.view(-1)[self.outlier_idx.long()] = self.outlier_values.float()
        return w.to(dtype)


def spqr_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    qq_bits: int = 3,
    qq_group_size: int = 16,
    outlier_threshold: float = 0.2,
    max_outliers: int | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    sync_free: bool | None = None,
) -> SpQRSolution:
    """Quantize W [out, in] given H [in, in] the SpQR way (see the module docstring).
    `sync_free`: select outliers with masks, reading nothing back per column (default: off the
    CPU); on the CPU, where a read costs nothing, by index (fewer, cheaper ops). Same result."""
    if spec.group_size <= 0:
        raise ConfigError(f"SpQR needs group_size > 0, got {spec.group_size}")
    W_in = W
    W = W.detach().clone().float()
    H = H.detach().float()  # read, never written: the factorization permutes its own copy
    out_f, in_f = W.shape
    gs, bits, maxq = spec.group_size, spec.bits, spec.maxq
    budget = out_f * in_f if max_outliers is None else max_outliers

    dead = torch.diag(H) == 0  # never active: 1 on H's diagonal (in the factorization), 0 in W
    W[:, dead] = 0
    diag = torch.diag(H)
    diag[dead] = 1
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(in_f, device=W.device)
    W = W[:, perm]
    fac = damped_inverse_cholesky(H, damp, order=perm)
    if fac.factor is None:
        # no damping made H positive definite: with H = I there is no error feedback and no
        # sensitivity weighting, so this is round-to-nearest onto SpQR's grid (no outliers)
        eye = torch.eye(in_f, device=W.device)
        sol = spqr_solve(W_in, eye, spec, qq_bits, qq_group_size, math.inf, 0, 0.0, block_size, act_order=False)
        return replace(sol, damp=fac.damp, damp_steps=fac.steps, fallback="rtn")
    Hinv = fac.factor
    dHinv = torch.diag(Hinv)

    # the layer's typical sensitivity: a weight replaced by its column mean
    scale_sens = (
        float((W.var(dim=0, unbiased=False) / dHinv**2).mean()) if out_f > 1 else float((W**2 / dHinv**2).mean())
    )
    thr = outlier_threshold * scale_sens if math.isfinite(outlier_threshold) else float("inf")
    use_outliers = math.isfinite(thr) and budget > 0

    n_groups = math.ceil(in_f / gs)
    dev = W.device
    codes = torch.zeros(out_f, in_f, device=dev)
    scales = torch.ones(out_f, n_groups, device=dev)
    zeros = torch.zeros(out_f, n_groups, device=dev)
    is_out = torch.zeros(out_f, in_f, dtype=torch.bool, device=dev)
    out_val = torch.zeros(out_f, in_f, device=dev)
    losses = torch.zeros(out_f, device=dev)
    # the outlier budget still left lives on the device: nothing in the column loop reads a value
    # back to the host, so a GPU runs it without waiting (the selections below are masks)
    if sync_free is None:
        sync_free = dev.type != "cpu"
    left = _Budget(budget, dev) if sync_free else None  # on the device; else `remaining` on the host
    remaining = budget
    B = max(gs, block_size - block_size % gs)  # blocks hold whole groups
    scale, zero = scales[:, 0], zeros[:, 0]  # set at every group's first column
    zero_code = zero
    forced = torch.zeros(out_f, gs, dtype=torch.bool, device=dev)
    g0 = 0
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # fit the group's statistics on the error-updated weights
                g = col // gs
                gw = W1[:, i : i + gs]
                gd = dHinv[col : col + gw.shape[1]]
                forced = torch.zeros_like(gw, dtype=torch.bool)
                if use_outliers and (left is not None or remaining > 0):
                    # weights that spoil the group's range are fitted around and reserved as
                    # outliers now, so they are never clamped onto a grid that excludes them
                    gain = leave_one_out_gain(gw, gd, bits, spec.symmetric).flatten()
                    if left is not None:
                        forced = left.take(gain, gain > thr, gw.shape[1], in_f - col).view_as(gw)
                    else:
                        cand = _top_by_index(gain, gain > thr, _share(remaining, gw.shape[1], in_f - col))
                        forced.view(-1)[cand] = True
                        remaining -= cand.numel()
                keep = ~forced
                g0 = col
                s, z = masked_minmax_params(gw, keep, bits, spec.symmetric)
                # an all-zero row would put scale 1 into its second-level run and ruin the
                # run's range; any scale represents it, so borrow a typical one (the lower median
                # of the other rows' scales, 1 when there are none)
                flat = (gw * keep).abs().amax(1) == 0
                typical = torch.nanmedian(torch.where(flat, torch.full_like(s, float("nan")), s))
                s = torch.where(flat, torch.nan_to_num(typical, nan=1.0), s)
                scale = quantize_stat(s, qq_bits, qq_group_size).clamp_min(torch.finfo(torch.float16).tiny)
                zero = z if spec.symmetric else quantize_stat(z, qq_bits, qq_group_size)
                scales[:, g], zeros[:, g] = scale, zero
                # the code under an outlier is the code of 0, as if the weight were absent
                zero_code = round_codes(torch.zeros_like(scale), scale, zero, maxq)
            w = W1[:, i]
            d = Hinv1[i, i]
            c = round_codes(w, scale, zero, maxq)
            q = scale * (c - zero)
            if use_outliers and left is not None:  # masks: nothing read back
                kept = forced[:, col - g0]
                sens = torch.where(kept, 0.0, ((w - q) / d) ** 2)  # already kept: not again
                kept = kept | left.take(sens, sens > thr, 1, in_f - col)
                keep_v = w.half().float()
                is_out[:, col] = kept
                out_val[:, col] = torch.where(kept, keep_v, 0.0)
                q = torch.where(kept, keep_v, q)
                c = torch.where(kept, zero_code, c)
            elif use_outliers:  # indices: on a CPU the reads are free and most columns have none
                cand = torch.nonzero(forced[:, col - g0]).flatten()
                if remaining > 0:
                    sens = ((w - q) / d) ** 2
                    sens[cand] = 0  # already kept: not again
                    extra = _top_by_index(sens, sens > thr, _share(remaining, 1, in_f - col))
                    remaining -= extra.numel()
                    cand = torch.cat([cand, extra])
                if cand.numel():
                    keep_v = w[cand].half().float()
                    is_out[cand, col] = True
                    out_val[cand, col] = keep_v
                    q = q.clone()
                    q[cand] = keep_v
                    c[cand] = zero_code[cand]
            codes[:, col] = c
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes, is_out, out_val = codes[:, inv], is_out[:, inv], out_val[:, inv]
    g_idx = None if not act_order else (inv // gs)  # group of each original column
    if g_idx is not None and torch.equal(g_idx, torch.arange(in_f, device=W.device) // gs):
        g_idx = None
    flat = torch.nonzero(is_out.flatten()).flatten()
    qw = SparseQuantizedWeight(
        codes.to(torch.uint8), scales, zeros, spec, g_idx, flat.to(torch.int32), out_val.flatten()[flat].half()
    )
    return SpQRSolution(qw.dequantize(), qw, float(losses.sum()), int(flat.numel()), thr, fac.damp, fac.steps)


@register("spqr")
class SpQR(HessianMethod):
    Config = SpQRConfig
    config: SpQRConfig

    def outlier_cap(self, out_f: int, in_f: int, spec: QuantSpec) -> int:
        """Most outliers this layer may keep: the fraction, tightened by the bits budget."""
        c = self.config
        cap = math.floor(c.max_outlier_fraction * out_f * in_f)
        if c.max_bits_per_param is not None:
            base = bits_used(out_f, in_f, spec.bits, spec.group_size, c.qq_bits, c.qq_group_size, 0, spec.symmetric)[
                "bits"
            ]
            spare = c.max_bits_per_param * out_f * in_f - base
            if spare < 0:
                raise ConfigError(
                    f"spqr: max_bits_per_param={c.max_bits_per_param} is below the "
                    f"{base / (out_f * in_f):.3f} bits codes and statistics take for a {out_f}x{in_f} layer"
                )
            cap = min(cap, math.floor(spare / OUTLIER_BITS))
        return cap

    def budget_bits(self, out_f: int, in_f: int, spec: QuantSpec) -> float:
        c = self.config
        allowed = bits_used(
            out_f,
            in_f,
            spec.bits,
            spec.group_size,
            c.qq_bits,
            c.qq_group_size,
            self.outlier_cap(out_f, in_f, spec),
            spec.symmetric,
        )["avg_bits"]
        return allowed

    def solve(self, name: str, linear: nn.Linear, stats: HessianStats, plan: LinearPlan) -> SolveResult:
        assert plan.weight is not None
        c = self.config
        spec = plan.weight
        if spec.group_size <= 0:
            raise ConfigError(f"spqr: {name} resolves to group_size={spec.group_size}; SpQR needs groups (> 0)")
        W = linear.weight.detach().float()
        out_f, in_f = W.shape
        sol = spqr_solve(
            W,
            stats.H,
            spec,
            c.qq_bits,
            c.qq_group_size,
            c.outlier_threshold,
            self.outlier_cap(out_f, in_f, spec),
            c.damp,
            c.block_size,
            c.act_order,
        )
        used = bits_used(
            out_f, in_f, spec.bits, spec.group_size, c.qq_bits, c.qq_group_size, sol.n_outliers, spec.symmetric
        )
        info = {
            "out_rel_err": hessian_error(W, sol.weight, stats.H),
            "gptq_loss": sol.loss,
            "outliers": sol.n_outliers,
            "outlier_fraction": sol.n_outliers / (out_f * in_f),
            "avg_bits": used["avg_bits"],
            "bits": used["bits"],
            "params": used["params"],
            "budget_bits": self.budget_bits(out_f, in_f, spec),
            "format": f"{spec.describe()} + {c.qq_bits}bit stats/{c.qq_group_size} + fp16 outliers",
            **sol.numerics(),
        }
        if sol.fallback is not None:  # no Hessian-weighted loss after the RTN fallback
            del info["gptq_loss"]
        return SolveResult(sol.weight, sol.qweight, info)
