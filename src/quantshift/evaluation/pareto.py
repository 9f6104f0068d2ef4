"""Quality against packed size: the packed-size estimate, the Pareto frontier, bootstrap intervals
of tokenizer-independent qualities (bits per byte, accuracy), iso-memory budgets, and rank
correlation with a bootstrap interval (is perplexity a proxy for task drops?).

Pure functions of the numbers given (numpy + scipy.stats.rankdata), seeded: a report recomputes
them exactly from cached results.

A *quality* is a mean over strata (held-out sources, or tasks) of a ratio of sums over one
stratum's [seeds x items] table: bits per byte = sum(NLL bits) / sum(bytes) over the windows,
accuracy = sum(correct) / sum(1) over the items. Its bootstrap resamples the seeds (the
quantized models of one configuration) and, independently, each stratum's items, as multinomial
counts, so a resample costs two matrix products whatever the number of items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DENSE_BITS = 16  # unquantized parameters as an fp16/bf16 export stores them


# ---------------------------------------------------------------- packed size


@dataclass(frozen=True)
class WeightFormat:
    bits: int
    group_size: int  # > 0: groups of columns; -1: one group per output row; 0: one per tensor
    sym: bool = False
    measured_bits: float | None = None  # total bits a method measured itself (SpQR), used as is
    dtype: Literal["int", "fp8"] = "int"


@dataclass(frozen=True)
class PackedSize:
    total_bytes: int
    quantized_params: int
    dense_params: int

    @property
    def bits_per_param(self) -> float:
        n = self.quantized_params + self.dense_params
        return 8 * self.total_bytes / n if n else float("nan")


def packed_size_bytes(
    param_shapes: dict[str, tuple[int, ...]], formats: dict[str, WeightFormat], dense_bits: int = DENSE_BITS
) -> PackedSize:
    """Bytes of a packed export from shapes alone: quantized weights (`formats`, keyed by module
    name, applying to `<module>.weight`) counted by quant.storage.quantized_linear_bytes, the
    same arithmetic as the `packed_bytes` a study records from the model itself; every other
    parameter at `dense_bits`. `param_shapes` lists each parameter once (tied embeddings once)."""
    from ..quant.primitives import QuantSpec
    from ..quant.storage import quantized_linear_bytes

    missing = [m for m in formats if f"{m}.weight" not in param_shapes]
    if missing:
        raise ValueError(f"quantized modules without a weight among the parameters: {missing[:3]}")
    q_names = {f"{m}.weight": f for m, f in formats.items()}
    total, q_params, d_params = 0, 0, 0
    for name, shape in param_shapes.items():
        n = int(math.prod(shape))
        fmt = q_names.get(name)
        if fmt is None:
            total += n * dense_bits // 8
            d_params += n
            continue
        spec = QuantSpec(bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.sym, dtype=fmt.dtype)
        total += quantized_linear_bytes(int(shape[0]), n // int(shape[0]), spec, dense_bits // 8, fmt.measured_bits)
        q_params += n
    return PackedSize(total, q_params, d_params)


# ---------------------------------------------------------------- frontier and budgets


def pareto_front(sizes: Sequence[float], qualities: Sequence[float], higher_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates (no larger and at least as good, one of them
    strictly), in increasing size. NaN qualities are never on it; of exact ties the first is kept."""
    sign = 1.0 if higher_better else -1.0
    order = sorted(
        (i for i, q in enumerate(qualities) if not math.isnan(q)), key=lambda i: (sizes[i], -sign * qualities[i], i)
    )
    front, best = [], -math.inf
    for i in order:
        if sign * qualities[i] > best:
            front.append(i)
            best = sign * qualities[i]
    return front


@dataclass(frozen=True)
class Candidate:
    model: str
    key: str
    size: float
    quality: float


def iso_memory_pairs(cands: Sequence[Candidate], params: dict[str, int], higher_better: bool = True) -> list[dict]:
    """For every byte budget (each candidate's size, ascending) and every pair of models, the best
    candidate of the larger model (more parameters) and of the smaller one within that budget;
    budgets where either has none, or where the picks are the same as at the last budget, are
    left out. Rows: {"budget", "larger", "smaller"} with the picked Candidates."""
    sign = 1.0 if higher_better else -1.0
    models = sorted({c.model for c in cands}, key=lambda m: -params[m])
    rows: list[dict] = []
    last: dict[tuple[str, str], tuple[str, str]] = {}
    for budget in sorted({c.size for c in cands}):
        for i, big in enumerate(models):
            for small in models[i + 1 :]:
                picks = []
                for m in (big, small):
                    fit = [c for c in cands if c.model == m and c.size <= budget and not math.isnan(c.quality)]
                    picks.append(max(fit, key=lambda c: (sign * c.quality, -c.size)) if fit else None)
                if None in picks or last.get((big, small)) == (picks[0].key, picks[1].key):  # type: ignore[union-attr]
                    continue
                last[(big, small)] = (picks[0].key, picks[1].key)  # type: ignore[union-attr]
                rows.append({"budget": budget, "larger": picks[0], "smaller": picks[1]})
    return rows


# ---------------------------------------------------------------- quality with intervals


@dataclass(frozen=True)
class Stratum:
    """One source or task of one configuration: per seed (row) and item (column), the numerator
    and denominator of the quality's ratio (NLL bits and bytes; correct and 1)."""

    num: np.ndarray
    den: np.ndarray
    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.num.shape != self.den.shape or self.num.ndim != 2 or self.num.shape[1] != len(self.ids):
            raise ValueError(
                f"stratum tables must both be [seeds, items={len(self.ids)}], got {self.num.shape} and {self.den.shape}"
            )

    def subset(self, ids: Sequence[str]) -> Stratum:
        pos = {i: k for k, i in enumerate(self.ids)}
        cols = [pos[i] for i in ids]
        return Stratum(self.num[:, cols], self.den[:, cols], tuple(ids))


Quality = dict[str, Stratum]  # stratum name -> table


def estimate(q: Quality) -> float:
    """Mean over strata of each stratum's ratio of sums (all seeds and items)."""
    if not q:
        return float("nan")
    return float(np.mean([s.num.sum() / s.den.sum() for s in q.values()]))


def _draws(q: Quality, n_boot: int, rng: np.random.Generator, items: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Bootstrap replicates of estimate(q): seeds resampled once per replicate for the whole
    configuration (a seed is one quantized model, scored on every stratum), items per stratum
    (`items`: given item counts, shared with another configuration for a paired comparison)."""
    seeds: dict[int, np.ndarray] = {}
    vals = []
    for name, s in q.items():
        n_seeds, n_items = s.num.shape
        if n_seeds not in seeds:
            seeds[n_seeds] = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot).astype(np.float64)
        d = seeds[n_seeds]
        c = (
            items[name]
            if items is not None
            else rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=n_boot).astype(np.float64)
        )
        num = np.einsum("bs,si,bi->b", d, s.num, c)
        den = np.einsum("bs,si,bi->b", d, s.den, c)
        vals.append(num / den)
    return np.mean(vals, axis=0)


def interval(q: Quality, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of estimate(q) over seeds and items."""
    if not q:
        return (float("nan"), float("nan"))
    d = _draws(q, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class Comparison:
    """b minus a, on the strata both have (paired: on the items both scored)."""

    a: float
    b: float
    diff: float
    ci: tuple[float, float]
    p: float  # two-sided bootstrap p of "no difference"
    strata: tuple[str, ...] = field(default_factory=tuple)
    paired: bool = False

    @property
    def significant(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0


def compare(
    a: Quality, b: Quality, paired: bool, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> Comparison | None:
    """Difference of qualities b - a with a bootstrap interval. Paired (same items, e.g. two
    quantizations of one model, or two models on one task's items): items are resampled
    together; unpaired (windows of different tokenizers cover different text): independently.
    Seeds are always resampled independently (different quantized models). None when the two
    share no stratum (or, paired, no item)."""
    names = [n for n in a if n in b]
    if paired:
        common = {n: [i for i in a[n].ids if i in set(b[n].ids)] for n in names}
        names = [n for n in names if common[n]]
        a = {n: a[n].subset(common[n]) for n in names}
        b = {n: b[n].subset(common[n]) for n in names}
    else:
        a, b = {n: a[n] for n in names}, {n: b[n] for n in names}
    if not names:
        return None
    rng = np.random.default_rng(seed)
    items = None
    if paired:
        items = {
            n: rng.multinomial(len(a[n].ids), np.full(len(a[n].ids), 1 / len(a[n].ids)), size=n_boot).astype(np.float64)
            for n in names
        }
    d = _draws(b, n_boot, rng, items) - _draws(a, n_boot, rng, items)
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    ea, eb = estimate(a), estimate(b)
    return Comparison(ea, eb, eb - ea, (float(lo), float(hi)), p, tuple(names), paired)


# ---------------------------------------------------------------- proxy correlation


@dataclass(frozen=True)
class RankCorrelation:
    rho: float
    ci: tuple[float, float]
    n: int
    p: float = float("nan")  # two-sided permutation p of "no association"
    alpha: float = 0.05

    @property
    def excludes_zero(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0

    @property
    def finding(self) -> bool:
        """The interval excludes 0 and the permutation test agrees: with a handful of models and
        tied drops the percentile bootstrap is far too narrow (5 models whose drops form a step
        give an interval above 0, while 1 in 5 orderings would correlate as strongly)."""
        return self.excludes_zero and self.p < self.alpha


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc, yc = x - x.mean(axis=-1, keepdims=True), y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc**2).sum(axis=-1) * (yc**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=-1) / den, np.nan)


def spearman_ci(
    x: Sequence[float], y: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> RankCorrelation:
    """Spearman's rho (average ranks for ties) and a percentile bootstrap interval over the
    (x, y) pairs (here: quantized models). Resamples whose x or y is constant have no rho and are
    dropped; with fewer than 3 pairs, or a constant x or y, rho and the interval are NaN."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    nan = float("nan")
    if n < 3:
        return RankCorrelation(nan, (nan, nan), n)
    rho = float(_pearson_rows(_rank_rows(xa), _rank_rows(ya)))
    if math.isnan(rho):
        return RankCorrelation(nan, (nan, nan), n)
    rng = np.random.default_rng(seed)
    p = permutation_p(xa, ya, rho, rng)
    idx = rng.integers(0, n, size=(n_boot, n))
    reps = _pearson_rows(_rank_rows(xa[idx]), _rank_rows(ya[idx]))
    reps = reps[np.isfinite(reps)]
    if reps.size < n_boot // 2:  # most resamples degenerate: no interval worth stating
        return RankCorrelation(rho, (nan, nan), n, p, alpha)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return RankCorrelation(rho, (float(lo), float(hi)), n, p, alpha)


def permutation_p(x: np.ndarray, y: np.ndarray, rho: float, rng: np.random.Generator, n_perm: int = 20000) -> float:
    """Two-sided p of Spearman's rho under "no association" (y's order independent of x's):
    exact over all orderings for up to 8 pairs, Monte Carlo beyond."""
    from itertools import permutations

    rx, ry = _rank_rows(x), _rank_rows(y)
    tol = 1e-12
    if x.size <= 8:
        perms = np.array(list(permutations(range(x.size))))
        rhos = _pearson_rows(np.broadcast_to(rx, perms.shape), ry[perms])
        return float((np.abs(rhos) >= abs(rho) - tol).mean())
    perms = np.argsort(rng.random((n_perm, x.size)), axis=1)
    rhos = _pearson_rows(np.broadcast_to(rx, perms.shape), ry[perms])
    return float(((np.abs(rhos) >= abs(rho) - tol).sum() + 1) / (n_perm + 1))
