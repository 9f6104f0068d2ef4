"""SpQR's solver as it was before its column loop stopped synchronising with the host: the
reference tests/test_spqr_quip.py compares the current `spqr_solve` against (kept verbatim, bar
its name; it reads each column's outliers with nonzero / numel on the host)."""

import math
from dataclasses import replace

import torch

from quantshift.errors import ConfigError
from quantshift.methods.spqr import (
    SparseQuantizedWeight,
    SpQRSolution,
    _share,
    leave_one_out_gain,
    masked_minmax_params,
    quantize_stat,
    round_codes,
)
from quantshift.quant.primitives import QuantSpec, damped_inverse_cholesky


def spqr_solve_per_column_syncs(
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
) -> SpQRSolution:
    """Quantize W [out, in] given H [in, in] the SpQR way (see the module docstring)."""
    if spec.group_size <= 0:
        raise ConfigError(f"SpQR needs group_size > 0, got {spec.group_size}")
    W_in = W
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    out_f, in_f = W.shape
    gs, bits, maxq = spec.group_size, spec.bits, spec.maxq
    budget = out_f * in_f if max_outliers is None else max_outliers

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    fac = damped_inverse_cholesky(H, damp)
    if fac.factor is None:
        # no damping made H positive definite: with H = I there is no error feedback and no
        # sensitivity weighting, so this is round-to-nearest onto SpQR's grid (no outliers)
        eye = torch.eye(in_f, device=W.device)
        sol = spqr_solve_per_column_syncs(
            W_in, eye, spec, qq_bits, qq_group_size, math.inf, 0, 0.0, block_size, act_order=False
        )
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
    codes = torch.zeros(out_f, in_f, device=W.device)
    scales = torch.ones(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)
    is_out = torch.zeros(out_f, in_f, dtype=torch.bool, device=W.device)
    out_val = torch.zeros(out_f, in_f, device=W.device)
    losses = torch.zeros(out_f, device=W.device)
    remaining = budget
    B = max(gs, block_size - block_size % gs)  # blocks hold whole groups
    scale, zero = scales[:, 0], zeros[:, 0]  # set at every group's first column
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
                if use_outliers and remaining > 0:
                    # weights that spoil the group's range are fitted around and reserved as
                    # outliers now, so they are never clamped onto a grid that excludes them
                    gain = leave_one_out_gain(gw, gd, bits, spec.symmetric)
                    cand = torch.nonzero((gain > thr).flatten()).flatten()
                    cap = _share(remaining, gw.shape[1], in_f - col)
                    if cand.numel() > cap:
                        cand = cand[torch.topk(gain.flatten()[cand], cap).indices]
                    forced.view(-1)[cand] = True
                    remaining -= cand.numel()
                keep = ~forced
                g0 = col
                s, z = masked_minmax_params(gw, keep, bits, spec.symmetric)
                # an all-zero row would put scale 1 into its second-level run and ruin the
                # run's range; any scale represents it, so borrow a typical one
                flat = (gw * keep).abs().amax(1) == 0
                if flat.any():
                    s = torch.where(flat, s[~flat].median() if (~flat).any() else s.new_tensor(1.0), s)
                scale = quantize_stat(s, qq_bits, qq_group_size).clamp_min(torch.finfo(torch.float16).tiny)
                zero = z if spec.symmetric else quantize_stat(z, qq_bits, qq_group_size)
                scales[:, g], zeros[:, g] = scale, zero
            w = W1[:, i]
            d = Hinv1[i, i]
            c = round_codes(w, scale, zero, maxq)
            q = scale * (c - zero)
            cand = torch.nonzero(forced[:, col - g0]).flatten()
            if use_outliers and remaining > 0:
                sens = ((w - q) / d) ** 2
                sens[cand] = 0  # already kept
                extra = torch.nonzero(sens > thr).flatten()
                cap = _share(remaining, 1, in_f - col)
                if extra.numel() > cap:
                    extra = extra[torch.topk(sens[extra], cap).indices]
                remaining -= extra.numel()
                cand = torch.cat([cand, extra])
            if cand.numel():
                keep_v = w[cand].half().float()
                is_out[cand, col] = True
                out_val[cand, col] = keep_v
                q = q.clone()
                q[cand] = keep_v
                # the code under an outlier is the code of 0, as if the weight were absent
                c[cand] = round_codes(torch.zeros_like(w[cand]), scale[cand], zero[cand], maxq)
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
