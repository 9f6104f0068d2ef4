"""Confidence intervals for accuracies (percentile bootstrap) and paired comparisons of two systems
(bootstrap interval of the difference, sign-flip randomization test for its p-value).

Pure functions over per-item scores (0/1 accuracies, F1s, ...), seeded, so a table can be
recomputed exactly from the saved sample-level scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np


def bootstrap_ci(
    values: Iterable[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of `values`."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0]) if x.size == 1 else float(x.mean()),) * 2
    rng = np.random.default_rng(seed)
    means = _resample_means(x[None, :], n_boot, rng)[0]
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def _resample_means(x: np.ndarray, n_boot: int, rng: np.random.Generator, chunk: int = 500) -> np.ndarray:
    """Means of `n_boot` resamples of the columns of x (rows resampled with the same indices)."""
    n = x.shape[1]
    out = []
    for start in range(0, n_boot, chunk):  # chunks keep memory flat for large n
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        out.append(x[:, idx].mean(axis=2))
    return np.concatenate(out, axis=1)


@dataclass
class PairedResult:
    mean_a: float
    mean_b: float
    diff: float  # mean_b - mean_a
    ci: tuple[float, float]
    p_value: float  # two-sided sign-flip randomization test of "no difference"
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(
    a: Iterable[float], b: Iterable[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> PairedResult:
    """Difference of means b - a on the same items (aligned lists), resampling items jointly."""
    xa = np.asarray(list(a), dtype=np.float64)
    xb = np.asarray(list(b), dtype=np.float64)
    if xa.shape != xb.shape:
        raise ValueError(f"paired scores need the same items: {xa.size} vs {xb.size}")
    if xa.size == 0:
        raise ValueError("paired bootstrap of zero items")
    rng = np.random.default_rng(seed)
    d = _resample_means((xb - xa)[None, :], n_boot, rng)[0]
    diff = float(xb.mean() - xa.mean())
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = sign_flip_p(xb - xa, seed=seed)
    return PairedResult(float(xa.mean()), float(xb.mean()), diff, (float(lo), float(hi)), p, int(xa.size))


def sign_flip_p(diffs: Iterable[float], n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of "mean paired difference is 0": under that null each difference's sign
    is a coin flip. Exact (all 2^n sign patterns) for n <= 14, Monte Carlo beyond. Unlike the
    bootstrap's "how often does the resampled mean cross 0", it stays honest for tiny n: with 2
    items the smallest possible p is 0.5, so 2 windows can never be called significant."""
    d = np.asarray(list(diffs), dtype=np.float64)
    observed = abs(d.mean()) if d.size else 0.0
    if observed == 0.0:
        return 1.0
    tol = 1e-12 * max(1.0, observed)
    if d.size <= 14:
        patterns = ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1) * 2 - 1
        return float((np.abs((patterns * d).mean(axis=1)) >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 1000):
        signs = rng.choice([-1.0, 1.0], size=(min(1000, n_perm - start), d.size))
        hits += int((np.abs((signs * d).mean(axis=1)) >= observed - tol).sum())
    return (hits + 1) / (n_perm + 1)


def align_samples(a: list[dict], b: list[dict], metric: str = "acc") -> tuple[list[float], list[float]]:
    """Scores of two runs' sample lists on the items both scored, matched by id."""
    sa = {s["id"]: s[metric] for s in a if s.get(metric) is not None}
    sb = {s["id"]: s[metric] for s in b if s.get(metric) is not None}
    ids = [i for i in sa if i in sb]
    return [sa[i] for i in ids], [sb[i] for i in ids]
