"""Calibration source vs calibration seed: how much of a metric's variation is due to which text
was used for calibration, and how much to which sample of it (the seed).

One column = one (model, method, bits, test set); its data is a table y[source] = [value per
seed]. Sources are the groups and seeds the replicates of a one-way random-effects layout, so a
source effect is only claimed when it stands out against the spread between seeds.

Perplexity noise is multiplicative (a seed moves ppl by a few percent whatever its level), so
callers pass `log=True` for perplexities and every mean, SD and difference is then on log(ppl);
differences come back as ratios too. Accuracies are used as they are.

Pure functions of the numbers given (numpy + scipy.stats); no I/O, no randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from scipy import stats

NAN = float("nan")


@dataclass(frozen=True)
class Decomposition:
    """One-way decomposition of a column. SDs and means are on the analysed scale (log for ppl).

    testable=False (with `reason`) when there is no replication to test against: then nothing
    in it may be stated as a finding.
    """

    testable: bool
    reason: str
    means: dict[str, float]
    counts: dict[str, int]
    alpha: float
    log: bool = False
    balanced: bool = False
    n0: float = NAN  # effective seeds per source (= n when balanced)
    ms_between: float = NAN
    ms_within: float = NAN
    df_between: int = 0
    df_within: int = 0
    f: float = NAN
    p: float = NAN
    seed_sd: float = NAN
    seed_sd_ci: tuple[float, float] = (NAN, NAN)
    source_sd: float = NAN
    source_sd_ci: tuple[float, float] = (NAN, NAN)
    source_share: float = NAN  # sigma2_source / (sigma2_source + sigma2_seed)
    source_share_ci: tuple[float, float] = (NAN, NAN)
    exact_ci: bool = False  # ratio and share intervals exact (balanced); else approximate (n0)
    significant: bool = False


@dataclass(frozen=True)
class Pair:
    """Source a minus source b (on the analysed scale); ratio = exp(diff) when log."""

    a: str
    b: str
    diff: float
    ci: tuple[float, float]  # unadjusted (1 - alpha) t-interval of diff
    p: float | None  # unadjusted two-sided p (None: not testable)
    p_holm: float | None  # Holm-adjusted over the pairs of the column
    significant: bool
    log: bool = False
    ratio: float | None = None
    ratio_ci: tuple[float, float] | None = None


@dataclass(frozen=True)
class _Layout:
    """Validated groups (finite values only) and why they cannot be tested, if so."""

    groups: dict[str, np.ndarray]
    reason: str = ""
    means: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- layout


def _layout(y: dict[str, list[float]], log: bool) -> _Layout:
    """Finite values per source (log taken when asked); the reason it is untestable, if any."""
    groups = {}
    for s, vals in y.items():
        x = np.asarray([v for v in vals if v is not None], dtype=np.float64)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.log(x)
        groups[s] = x[np.isfinite(x)]
    means = {s: float(x.mean()) if x.size else NAN for s, x in groups.items()}
    short = [s for s, x in groups.items() if x.size < 2]
    if len(groups) < 2:
        return _Layout(groups, "fewer than 2 calibration sources", means)
    if short:
        return _Layout(
            groups,
            "no replication: fewer than 2 seeds for " + ", ".join(f"{s} ({groups[s].size})" for s in short),
            means,
        )
    if all(np.ptp(x) == 0 for x in groups.values()):
        # seeds that change nothing are not replicates: there is no seed noise to test against
        return _Layout(
            groups,
            "every seed gave the same value within each source (the seed does not "
            "change this column): no replication noise to test against",
            means,
        )
    return _Layout(groups, "", means)


def _anova(groups: dict[str, np.ndarray]) -> dict:
    """Sums of squares and mean squares of the one-way layout."""
    xs = list(groups.values())
    n_i = np.array([x.size for x in xs], dtype=np.float64)
    k, big_n = len(xs), float(n_i.sum())
    grand = float(np.concatenate(xs).mean())
    ssb = float(sum(x.size * (x.mean() - grand) ** 2 for x in xs))
    ssw = float(sum(((x - x.mean()) ** 2).sum() for x in xs))
    dfb, dfw = k - 1, int(big_n) - k
    n0 = (big_n - float((n_i**2).sum()) / big_n) / dfb
    return {
        "ssb": ssb,
        "ssw": ssw,
        "dfb": dfb,
        "dfw": dfw,
        "msb": ssb / dfb,
        "msw": ssw / dfw,
        "n0": n0,
        "balanced": bool(np.all(n_i == n_i[0])),
    }


def _ratio_ci(f_obs: float, dfb: int, dfw: int, n0: float, alpha: float) -> tuple[float, float]:
    """Interval of theta = sigma2_source / sigma2_seed from F / (1 + n theta) ~ F(dfb, dfw)
    (exact when balanced; with n0 in place of n otherwise), truncated at 0."""
    hi_q, lo_q = stats.f.ppf(1 - alpha / 2, dfb, dfw), stats.f.ppf(alpha / 2, dfb, dfw)
    return max(0.0, float(f_obs / hi_q - 1) / n0), max(0.0, float(f_obs / lo_q - 1) / n0)


# ---------------------------------------------------------------- public


def decompose(y: dict[str, list[float]], alpha: float = 0.05, *, log: bool = False) -> Decomposition:
    """Source vs seed decomposition of one column (sources = groups, seeds = replicates).

    seed SD = sqrt(MSW) with a chi-square interval; source SD = sqrt(max(0, (MSB - MSW) / n0))
    with the interval of the ratio sigma2_source/sigma2_seed (F distribution) times MSW; share of
    variance = theta / (1 + theta) with the same ratio interval. F test of "no source effect".
    """
    lay = _layout(y, log)
    counts = {s: int(x.size) for s, x in lay.groups.items()}
    if lay.reason:
        return Decomposition(False, lay.reason, lay.means, counts, alpha, log)
    a = _anova(lay.groups)
    msb, msw, dfb, dfw, n0 = a["msb"], a["msw"], a["dfb"], a["dfw"], a["n0"]  # msw > 0: _layout saw seed spread
    f_obs = msb / msw
    p = float(stats.f.sf(f_obs, dfb, dfw))
    seed_ci = (
        math.sqrt(a["ssw"] / stats.chi2.ppf(1 - alpha / 2, dfw)),
        math.sqrt(a["ssw"] / stats.chi2.ppf(alpha / 2, dfw)),
    )
    s2_source = max(0.0, (msb - msw) / n0)
    t_lo, t_hi = _ratio_ci(f_obs, dfb, dfw, n0, alpha)
    return Decomposition(
        True,
        "",
        lay.means,
        counts,
        alpha,
        log,
        a["balanced"],
        n0,
        msb,
        msw,
        dfb,
        dfw,
        f_obs,
        p,
        math.sqrt(msw),
        seed_ci,
        math.sqrt(s2_source),
        (math.sqrt(t_lo * msw), math.sqrt(t_hi * msw)),
        s2_source / (s2_source + msw),
        (t_lo / (1 + t_lo), t_hi / (1 + t_hi)),
        a["balanced"],
        p < alpha,
    )


def holm(ps: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given)."""
    m = len(ps)
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def pairwise(y: dict[str, list[float]], alpha: float = 0.05, *, log: bool = False) -> list[Pair]:
    """Every pair of sources: difference of means with a t-interval on the pooled seed variance
    (df = N - k), two-sided p, Holm-adjusted over the column's pairs. Untestable columns give
    pairs with p None and significant False."""
    lay = _layout(y, log)
    names = list(lay.groups)
    if lay.reason:
        return [
            _pair(a, b, lay.means[a] - lay.means[b], (NAN, NAN), None, None, alpha, log)
            for a, b in combinations(names, 2)
        ]
    an = _anova(lay.groups)
    q = stats.t.ppf(1 - alpha / 2, an["dfw"])
    raw = []
    for a, b in combinations(names, 2):
        d = lay.means[a] - lay.means[b]
        se = math.sqrt(an["msw"] * (1 / lay.groups[a].size + 1 / lay.groups[b].size))
        p = float(2 * stats.t.sf(abs(d) / se, an["dfw"]))
        raw.append((a, b, d, (float(d - q * se), float(d + q * se)), p))
    adj = holm([r[4] for r in raw])
    return [_pair(a, b, d, ci, p, pa, alpha, log) for (a, b, d, ci, p), pa in zip(raw, adj)]


def _pair(
    a: str,
    b: str,
    d: float,
    ci: tuple[float, float],
    p: float | None,
    p_holm: float | None,
    alpha: float,
    log: bool,
) -> Pair:
    ratio = (math.exp(d), (math.exp(ci[0]), math.exp(ci[1]))) if log and math.isfinite(d) else (None, None)
    return Pair(a, b, d, ci, p, p_holm, p_holm is not None and p_holm < alpha, log, *ratio)


def oriented(pair: Pair, first: str) -> Pair:
    """The same comparison written as `first` minus the other source."""
    if pair.a == first:
        return pair
    ci = (-pair.ci[1], -pair.ci[0])
    ratio = (math.exp(-pair.diff), (math.exp(ci[0]), math.exp(ci[1]))) if pair.ratio is not None else (None, None)
    return Pair(pair.b, pair.a, -pair.diff, ci, pair.p, pair.p_holm, pair.significant, pair.log, *ratio)


def clear_best(
    y: dict[str, list[float]], lower_is_better: bool, alpha: float = 0.05, *, log: bool = False
) -> str | None:
    """The source with the best mean when the F test is significant and it beats every other
    source significantly (Holm); None otherwise. The only "best" a report may highlight."""
    dec = decompose(y, alpha, log=log)
    if not (dec.testable and dec.significant):
        return None
    best = _best(dec.means, lower_is_better)
    return (
        best
        if all(_beats(oriented(p, best), lower_is_better) for p in pairwise(y, alpha, log=log) if best in (p.a, p.b))
        else None
    )


def source_findings(
    y: dict[str, list[float]],
    iid_source: str | None,
    lower_is_better: bool,
    alpha: float = 0.05,
    *,
    log: bool = False,
    test: str = "this test set",
    unit: str = "",
) -> list[dict]:
    """Statements about calibration sources that the seed spread supports, as dicts with
    `finding` (bool), `kind` and `text`. A finding needs a significant F test AND Holm-significant
    pairs; everything else comes back as one non-finding line saying why."""
    dec = decompose(y, alpha, log=log)
    if not dec.testable:
        return [{"finding": False, "kind": "untestable", "text": f"no finding for {test}: {dec.reason}"}]
    if not dec.significant:
        return [
            {
                "finding": False,
                "kind": "within_seed_spread",
                "p": dec.p,
                "text": f"no finding for {test}: the source effect is within the seed spread "
                f"(F = {dec.f:.2f}, p = {dec.p:.3g})",
            }
        ]
    pairs = pairwise(y, alpha, log=log)
    effect = lambda p: _effect(p, alpha, unit)  # noqa: E731
    best = clear_best(y, lower_is_better, alpha, log=log)
    if iid_source is not None and best == iid_source:
        vs = [oriented(p, best) for p in pairs if best in (p.a, p.b)]
        closest = max(vs, key=lambda p: p.p_holm if p.p_holm is not None else -1.0)
        return [
            {
                "finding": True,
                "kind": "iid_best",
                "source": best,
                "p": dec.p,
                "closest": closest.b,
                "p_holm_max": closest.p_holm,
                "text": f"I.I.D. calibration ({best}) is best for {test}: it beats every other source "
                f"(F p = {dec.p:.3g}; closest {closest.b}: {effect(closest)}, Holm p = {closest.p_holm:.3g})",
            }
        ]
    out = []
    for p in pairs:
        if not p.significant:
            continue
        w = p if _beats(p, lower_is_better) else oriented(p, p.b)
        out.append(
            {
                "finding": True,
                "kind": "pair",
                "winner": w.a,
                "loser": w.b,
                "diff": w.diff,
                "ci": w.ci,
                "ratio": w.ratio,
                "ratio_ci": w.ratio_ci,
                "p_holm": w.p_holm,
                "text": f"{w.a} beats {w.b} on {test}: {effect(w)}, Holm p = {w.p_holm:.3g}",
            }
        )
    if not out:
        out.append(
            {
                "finding": False,
                "kind": "no_pair",
                "p": dec.p,
                "text": f"no finding for {test}: the F test finds a source effect (p = {dec.p:.3g}) "
                f"but no pair of sources differs after Holm correction",
            }
        )
    return out


# ---------------------------------------------------------------- small helpers


def _best(means: dict[str, float], lower_is_better: bool) -> str:
    return (min if lower_is_better else max)(means, key=lambda s: means[s])


def _beats(p: Pair, lower_is_better: bool) -> bool:
    """p.a significantly better than p.b."""
    return p.significant and (p.diff < 0 if lower_is_better else p.diff > 0)


def _effect(p: Pair, alpha: float, unit: str = "") -> str:
    level = f"{100 * (1 - alpha):g}% CI"
    if p.log:
        assert p.ratio_ci is not None  # a log-scale pair always carries its ratio interval
        return f"ratio {p.ratio:.3f} ({level} {p.ratio_ci[0]:.3f}–{p.ratio_ci[1]:.3f})"
    return f"difference {p.diff:+.3g}{unit} ({level} {p.ci[0]:+.3g} to {p.ci[1]:+.3g}{unit})"
