"""Does task difficulty predict the accuracy a quantized model loses?

An item's difficulty is the share of the unquantized reference models that get it wrong (so it is
measured, not assumed; a task's own difficulty labels, where BIG-bench gives them, can be passed
instead). Each item's drop is the reference's correctness minus the quantized model's (-1, 0 or
+1). The drop is regressed on difficulty by least squares over items, and the slope gets a
percentile bootstrap interval over items: the verdict "harder items lose more" (or less) is
stated only when that interval excludes zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def item_difficulty(references: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """1 - mean correctness over the reference models, for the items every reference scored."""
    if not references:
        raise ValueError("item difficulty needs at least one reference model's per-item correctness")
    common = set(references[0]).intersection(*references[1:])
    return {i: 1.0 - float(np.mean([r[i] for r in references])) for i in sorted(common)}


@dataclass(frozen=True)
class DifficultyFit:
    slope: float  # accuracy drop per unit of difficulty (drop in [-1, 1], difficulty in [0, 1])
    ci: tuple[float, float]
    intercept: float
    n: int  # items
    alpha: float = 0.05

    @property
    def significant(self) -> bool:
        lo, hi = self.ci
        return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))

    def verdict(self) -> str:
        if not self.significant:
            return (
                f"no significant relation between difficulty and drop (slope {self.slope:+.3f}, "
                f"{100 * (1 - self.alpha):.0f}% CI [{self.ci[0]:+.3f}, {self.ci[1]:+.3f}], {self.n} items)"
            )
        side = "harder items lose more" if self.slope > 0 else "easier items lose more"
        return (
            f"{side}: slope {self.slope:+.3f}, {100 * (1 - self.alpha):.0f}% CI "
            f"[{self.ci[0]:+.3f}, {self.ci[1]:+.3f}], {self.n} items"
        )


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slopes and intercepts of y on x along the last axis (NaN slope where x is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    sxx = (xc * xc).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, (xc * (y - y.mean(axis=-1, keepdims=True))).sum(axis=-1) / sxx, np.nan)
    return slope, y.mean(axis=-1) - slope * x.mean(axis=-1)


def drop_vs_difficulty(
    difficulty: Mapping[str, float],
    reference: Mapping[str, float],
    quantized: Mapping[str, float],
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> DifficultyFit:
    """Least-squares slope of the per-item drop (reference - quantized correctness) on difficulty,
    with a percentile bootstrap interval over the items all three maps share."""
    ids = sorted(set(difficulty) & set(reference) & set(quantized))
    if len(ids) < 3:
        raise ValueError(f"difficulty vs drop needs at least 3 shared items, got {len(ids)}")
    x = np.array([difficulty[i] for i in ids], dtype=np.float64)
    y = np.array([reference[i] - quantized[i] for i in ids], dtype=np.float64)
    slope, intercept = _ols(x, y)
    nan = float("nan")
    if not np.isfinite(slope):  # every item equally difficult: no slope to estimate
        return DifficultyFit(nan, (nan, nan), nan, len(ids), alpha)
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    reps, _ = _ols(x[idx], y[idx])
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2]) if reps.size >= n_boot // 2 else (nan, nan)
    return DifficultyFit(float(slope), (float(lo), float(hi)), float(intercept), len(ids), alpha)
