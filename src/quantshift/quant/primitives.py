"""Pure quantization math: number formats, qparams, quantize / dequantize, packing.

Conventions (shared by every method and exporter):
- integer codes are unsigned in [0, 2**bits - 1] with an integer zero point; a symmetric grid
  uses zero = 2**(bits-1), so `codes - zero` is the signed code in [-2**(bits-1), 2**(bits-1)-1];
- the quantization range always contains 0 (as in the reference GPTQ), so zero is exact and
  padding a partial last group with zeros never changes its parameters;
- group_size > 0: groups of that many consecutive input columns (the last may be partial);
  group_size == -1: one group per output row (per-channel); group_size == 0: per-tensor.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import field_validator, model_validator

from ..config import StrictModel, granularity

FP8_E4M3_MAX = 448.0


class QuantSpec(StrictModel):
    """A number format for weights or activations (what the values may be, not how chosen)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    dtype: Literal["int", "fp8"] = "int"

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < -1:
            raise ValueError("group_size must be > 0 (groups), -1 (per channel) or 0 (per tensor)")
        return v

    @model_validator(mode="after")
    def _bits(self) -> QuantSpec:
        if self.dtype == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8 for integer grids, got {self.bits}")
        if self.dtype == "fp8" and self.bits != 8:
            raise ValueError(f"fp8 has 8 bits, got bits={self.bits}")
        return self

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def describe(self) -> str:
        kind = "fp8-e4m3" if self.dtype == "fp8" else ("sym" if self.symmetric else "asym")
        return f"{self.bits}bit {kind} {granularity(self.group_size)}"


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, float-typed) zero point for ranges [xmin, xmax]."""
    maxq = 2**bits - 1
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    # an all-zero group: any positive scale represents it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq] (returned in x's float dtype for cheap arithmetic)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero, maxq), scale, zero)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, ngroups, g], zero-padding a partial last group."""
    out_f, in_f = w.shape
    g = group_size if group_size > 0 else in_f
    pad = (-in_f) % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, -1, g)


def weight_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale/zero of a 2-D weight: shapes [out, ngroups] ([1, 1] per-tensor)."""
    if spec.dtype == "fp8":
        amax = w.abs().amax() if spec.group_size == 0 else w.abs().amax(dim=1, keepdim=True)
        scale = (amax / FP8_E4M3_MAX).clamp_min(1e-12).reshape(-1, 1)
        return scale.float(), torch.zeros_like(scale).float()
    if spec.group_size == 0:
        scale, zero = qparams_from_range(w.min().reshape(1, 1), w.max().reshape(1, 1), spec.bits, spec.symmetric)
        return scale, zero
    grouped = _grouped(w.float(), spec.group_size)
    return qparams_from_range(grouped.amin(dim=2), grouped.amax(dim=2), spec.bits, spec.symmetric)


def expand_to_columns(p: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, ngroups] per-group parameter -> [out, in] per-element."""
    if group_size <= 0:
        return p.expand(-1, in_features)
    return p.repeat_interleave(group_size, dim=1)[:, :in_features]


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 value (torch's float8 dtype) after scaling."""
    y = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)
    return y * scale


@dataclass
class QuantizedWeight:
    """Integer codes of a weight with their per-group parameters."""

    codes: torch.Tensor  # [out, in] uint8 (int grids) or float8 (fp8)
    scale: torch.Tensor  # [out, ngroups]
    zero: torch.Tensor  # [out, ngroups]
    spec: QuantSpec
    g_idx: torch.Tensor | None = None  # [in] group of each column (act-order), None = sequential

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.spec.dtype == "fp8":
            return (self.codes.to(torch.float32) * self.scale).to(dtype)
        scale, zero = self.column_params()
        return dequantize(self.codes.float(), scale, zero).to(dtype)

    def column_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        in_f = self.codes.shape[1]
        if self.g_idx is not None:
            return self.scale[:, self.g_idx], self.zero[:, self.g_idx]
        gs = self.spec.group_size
        return expand_to_columns(self.scale, in_f, gs), expand_to_columns(self.zero, in_f, gs)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight under `spec`."""
    w = w.float()
    scale, zero = weight_qparams(w, spec)
    s = expand_to_columns(scale, w.shape[1], spec.group_size)
    if spec.dtype == "fp8":
        codes = (w / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight(codes, scale, zero, spec)
    z = expand_to_columns(zero, w.shape[1], spec.group_size)
    codes = quantize(w, s, z, spec.maxq).to(torch.uint8)
    return QuantizedWeight(codes, scale, zero, spec)


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize_weight(w, spec).dequantize(), computed group by group in place for integer grids
    (searches call this in their inner loops; per-column parameter copies would dominate)."""
    if spec.dtype == "fp8" or spec.group_size == 0:
        return quantize_weight(w, spec).dequantize(w.dtype)
    out_f, in_f = w.shape
    g = _grouped(w.float(), spec.group_size)  # [out, ngroups, gs]; per-channel: one group per row
    scale, zero = qparams_from_range(
        g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True), spec.bits, spec.symmetric
    )
    q = (torch.clamp(torch.round(g / scale) + zero, 0, spec.maxq) - zero) * scale
    return q.reshape(out_f, -1)[:, :in_f].to(w.dtype)


def fake_quantize_activation(x: torch.Tensor, spec: QuantSpec, per_token: bool = True) -> torch.Tensor:
    """Dynamic activation fake-quant: one range per token (last dim) or per tensor."""
    xf = x.float()
    if spec.dtype == "fp8":
        amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax()
        return fp8_fake_quantize(xf, (amax / FP8_E4M3_MAX).clamp_min(1e-12)).to(x.dtype)
    if per_token:
        xmin, xmax = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
    else:
        xmin, xmax = xf.amin().reshape(1), xf.amax().reshape(1)
    scale, zero = qparams_from_range(xmin, xmax, spec.bits, spec.symmetric)
    return fake_quantize(xf, scale, zero, spec.maxq).to(x.dtype)


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) into int32 words along `dim`, low bits first.

    Only widths that divide 32 (2, 4, 8) pack without straddling words, which is what the
    int32-packed checkpoint formats use.
    """
    if 32 % bits:
        raise ValueError(f"packing supports 2, 4 or 8 bits, not {bits}")
    per = 32 // bits
    c = codes.to(torch.int64).movedim(dim, -1)
    pad = (-c.shape[-1]) % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    words = (c << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack_codes(words: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_codes: the first `length` codes along `dim`, as uint8."""
    per = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    codes = codes.reshape(*codes.shape[:-2], -1)[..., :length]
    return codes.to(torch.uint8).movedim(-1, dim)


def _bit_runs(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the shortest run of `bits`-bit codes that fills whole bytes."""
    per = 8 // math.gcd(bits, 8)
    return per, per * bits // 8


def pack_bits(codes: torch.Tensor, bits: int, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Unsigned codes [rows, n] (< 2**bits, any width 1..8) -> uint8 [rows, ceil(n * bits / 8)]:
    each row a little-endian bit stream, code j in bits [j*bits, (j+1)*bits). Dense for every
    width (3-bit codes take 3/8 of a byte), which is how a quantized directory stores them; rows
    go in chunks so the int64 temporaries stay small for any matrix."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits takes 1..8-bit codes, not {bits}")
    rows, n = codes.shape
    width = (n * bits + 7) // 8
    if bits == 8:
        return codes.to(torch.uint8).clone()
    per, nbytes = _bit_runs(bits)
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=codes.device) * 8
    out = torch.empty(rows, width, dtype=torch.uint8, device=codes.device)
    step = rows_per_chunk or max(1, (1 << 20) // max(1, n))
    pad = (-n) % per
    for r0 in range(0, rows, step):
        c = codes[r0 : r0 + step].to(torch.int64)
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        words = (c.reshape(c.shape[0], -1, per) << shifts).sum(dim=-1)
        b = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
        out[r0 : r0 + step] = b.reshape(c.shape[0], -1)[:, :width].to(torch.uint8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Inverse of pack_bits: the first `n` codes of each row, as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits takes 1..8-bit codes, not {bits}")
    rows, width = packed.shape
    if width != (n * bits + 7) // 8:
        raise ValueError(f"{width} bytes per row do not hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.uint8).clone()
    per, nbytes = _bit_runs(bits)
    groups = -(-n // per)
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=packed.device) * 8
    out = torch.empty(rows, n, dtype=torch.uint8, device=packed.device)
    step = rows_per_chunk or max(1, (1 << 20) // max(1, n))
    for r0 in range(0, rows, step):
        b = packed[r0 : r0 + step].to(torch.int64)
        b = torch.nn.functional.pad(b, (0, groups * nbytes - width))
        words = (b.reshape(b.shape[0], groups, nbytes) << byte_shifts).sum(dim=-1)
        c = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
        out[r0 : r0 + step] = c.reshape(b.shape[0], -1)[:, :n].to(torch.uint8)
    return out


_HALF_GRAM = {"ok": True}


def half_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x with float32 output from 16-bit x (torch.mm with out_dtype, PyTorch 2.8+, GPUs)."""
    return torch.mm(x.t(), x, out_dtype=torch.float32)


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x in float32 (x: [tokens, features]).

    16-bit x on a GPU: torch.mm with float32 output on the tensor cores; products of 16-bit floats
    are exact in float32 and the GEMM sums in float32, so this is upcasting first up to summation
    order. On a CPU torch has no float32-output bf16 GEMM, and a bf16-output one rounds every
    entry to 2^-9, which on LLM activations (a few massive channels, strongly correlated ones)
    leaves x^T x indefinite beyond GPTQ's 1% damping (measured on SmolLM2): float32 there."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and _HALF_GRAM["ok"]:
        try:
            return half_gram(x)
        except (RuntimeError, TypeError) as err:  # a torch or GPU without the fp32-output GEMM
            warnings.warn(f"float32-output half GEMM unavailable ({err}); Hessians use float32 GEMMs", stacklevel=2)
            _HALF_GRAM["ok"] = False
    x = x.float()
    return x.t() @ x if x.is_cuda else symmetric_gram(x)


def symmetric_gram(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """x^T x from the blocks on and above the diagonal only, mirrored: torch has no SYRK, and
    on a CPU this does ~2/3 of the flops of the full product (measured 30% faster here)."""
    n = x.shape[1]
    if n <= block:
        return x.t() @ x
    parts = [(i, min(i + block, n)) for i in range(0, n, block)]
    G = x.new_empty(n, n)
    for a, (i0, i1) in enumerate(parts):
        xi_t = x[:, i0:i1].t()
        for j0, j1 in parts[a:]:
            blk = xi_t @ x[:, j0:j1]
            G[i0:i1, j0:j1] = blk
            if j0 != i0:
                G[j0:j1, i0:i1] = blk.t()
    return G


# --- damped Hessian factorization (GPTQ family) ---------------------------------------------

DAMP_STEP = 10.0  # each retry multiplies the relative damping by this
DAMP_CAP = 1.0  # the largest relative damping tried: H + mean(diag H) * I


def damp_schedule(damp: float, cap: float = DAMP_CAP, step: float = DAMP_STEP) -> list[float]:
    """Relative dampings to try, in order: the configured one, then x `step` at a time up to and
    including the cap (an undamped start retries from cap / step^2, GPTQ's usual 1%)."""
    out = [damp]
    while out[-1] < cap * (1 - 1e-9):
        out.append(min(out[-1] * step if out[-1] > 0 else cap / step**2, cap))
    return out


@dataclass(frozen=True)
class DampedFactor:
    """What factoring a damped Hessian gave: the factor, or None when no damping up to the cap
    made it positive definite (the caller then rounds to nearest instead)."""

    factor: torch.Tensor | None  # upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U
    damp: float  # relative damping of the factor (the last one tried when factor is None)
    steps: int  # how many times the damping was raised

    @property
    def ok(self) -> bool:
        return self.factor is not None


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t, read in one pass without a boolean copy of it (NaN and inf reach the
    min or the max); 15x faster than isfinite(t).all() on a large Hessian."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def reversed_gather_cm(H: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """J P H P^T J (rows and columns in `order`, then both reversed) as a new column-major
    matrix (LAPACK's layout, so it can be factored in place), gathered a band at a time so no
    second full-size temporary exists. Column-major, not the transpose's row-major: an
    accumulated H need not be exactly symmetric, and Cholesky must read this lower triangle."""
    n = H.shape[0]
    rev = order.flip(0)
    out = torch.empty(n, n, dtype=H.dtype, device=H.device)  # holds the transpose, row by row
    band = max(1, 2**24 // max(n, 1))
    for s in range(0, n, band):
        out[s : s + band] = H.index_select(1, rev[s : s + band]).index_select(0, rev).t()
    return out.mT


def damped_inverse_cholesky(
    H: torch.Tensor, damp: float, cap: float = DAMP_CAP, step: float = DAMP_STEP, order: torch.Tensor | None = None
) -> DampedFactor:
    """Upper Cholesky factor of (P H P^T + d * mean(diag H) * I)^-1, P the permutation that visits
    channels in `order` (identity when None), for the first d of damp_schedule(damp, cap, step)
    that makes the damped H positive definite. Dead channels (zero diagonal: never active) get 1
    on the diagonal first. H itself is not changed.

    Dead or duplicated input channels, few calibration tokens and 16-bit activations leave H
    singular or slightly indefinite; GPTQ tools retry with more damping rather than stop the run.
    Memory: two n x n matrices besides H at the peak (the permuted copy, factored in place, and
    the inverse factor)."""
    schedule = damp_schedule(damp, cap, step)
    if not all_finite(H):
        return DampedFactor(None, schedule[-1], len(schedule) - 1)
    n = H.shape[0]
    if order is None:
        order = torch.arange(n, device=H.device)
    diag = torch.diag(H)[order]  # the permuted diagonal, in visiting order
    diag[diag == 0] = 1
    mean_diag = torch.mean(diag)
    for k, d in enumerate(schedule):
        # With J the exchange matrix and J H J = R R^T (R lower), H = V V^T for the upper
        # V = J R J, so H^-1 = U^T U with U = V^-1 = J R^-1 J: one Cholesky and one triangular
        # inverse instead of Cholesky, full inverse and a second Cholesky (U is unique)
        R = reversed_gather_cm(H, order)
        R.diagonal().copy_((diag + d * mean_diag).flip(0))
        # factored in place: potrf overwrites the lower triangle with the factor, bit for bit
        # what the out-of-place call returns, without its copy
        info = torch.empty((), dtype=torch.int32, device=H.device)
        torch.linalg.cholesky_ex(R, out=(R, info))
        if int(info) != 0:
            continue
        # R^-1 overwrites a column-major identity in place: bit for bit the result a new tensor
        # would hold (LAPACK's layout either way)
        U = torch.eye(n, dtype=H.dtype, device=H.device).mT
        torch.linalg.solve_triangular(R, U, upper=False, out=U)
        del R
        U = U.flip(0, 1)
        if all_finite(U):
            return DampedFactor(U, d, k)
    return DampedFactor(None, schedule[-1], len(schedule) - 1)
