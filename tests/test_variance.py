"""Calibration source vs seed: the decomposition's math, the findings it allows, and the report section."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from quantshift.evaluation.variance import clear_best, decompose, holm, pairwise, source_findings

SOURCES = ["wikipedia", "news", "pydocs", "zh-news"]
SEEDS = [42, 567, 1234]


# ---------------------------------------------------------------- math


def test_hand_computed_anova_matches_f_oneway():
    y = {"a": [1.0, 2.0, 3.0], "b": [2.0, 4.0, 3.5], "c": [7.0, 6.0, 8.0]}
    d = decompose(y)
    # by hand: means 2, 19/6, 7; grand mean 73/18; SSB = 739/18, SSW = 37/6
    assert d.ms_between == pytest.approx(float(Fraction(739, 36)))
    assert d.ms_within == pytest.approx(float(Fraction(37, 36)))
    assert (d.df_between, d.df_within) == (2, 6) and d.balanced and d.exact_ci and d.n0 == 3
    ref = stats.f_oneway(*y.values())
    assert d.f == pytest.approx(float(Fraction(739, 37))) and d.f == pytest.approx(ref.statistic)
    assert d.p == pytest.approx(ref.pvalue) and d.significant
    assert d.seed_sd == pytest.approx(math.sqrt(37 / 36))
    assert d.source_sd == pytest.approx(math.sqrt((739 / 36 - 37 / 36) / 3))
    assert d.source_share == pytest.approx((702 / 108) / (702 / 108 + 37 / 36))
    # chi-square interval of the seed SD
    assert d.seed_sd_ci == pytest.approx(
        (math.sqrt(37 / 6 / stats.chi2.ppf(0.975, 6)), math.sqrt(37 / 6 / stats.chi2.ppf(0.025, 6)))
    )
    # exact interval of the ratio theta: F / (1 + 3 theta) ~ F(2, 6)
    lo = (d.f / stats.f.ppf(0.975, 2, 6) - 1) / 3
    hi = (d.f / stats.f.ppf(0.025, 2, 6) - 1) / 3
    assert d.source_share_ci == pytest.approx((lo / (1 + lo), hi / (1 + hi)))
    assert d.source_sd_ci == pytest.approx((math.sqrt(lo * 37 / 36), math.sqrt(hi * 37 / 36)))


def test_unbalanced_layout_uses_n0_and_says_approximate():
    y = {"a": [1.0, 2.0], "b": [2.0, 4.0, 3.5, 3.0], "c": [7.0, 6.0, 8.0]}
    d = decompose(y)
    ref = stats.f_oneway(*y.values())
    assert d.f == pytest.approx(ref.statistic) and d.p == pytest.approx(ref.pvalue)
    assert d.n0 == pytest.approx((9 - (4 + 16 + 9) / 9) / 2) and not d.balanced and not d.exact_ci


def test_pairwise_t_and_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    y = {"a": [1.0, 2.0, 3.0], "b": [2.0, 4.0, 3.5], "c": [7.0, 6.0, 8.0]}
    pairs = {(p.a, p.b): p for p in pairwise(y)}
    ac = pairs[("a", "c")]
    se = math.sqrt(37 / 36 * (1 / 3 + 1 / 3))
    assert ac.diff == pytest.approx(-5.0)
    assert ac.p == pytest.approx(2 * stats.t.sf(5 / se, 6))
    assert ac.ci == pytest.approx((-5 - stats.t.ppf(0.975, 6) * se, -5 + stats.t.ppf(0.975, 6) * se))
    raw = [pairs[k].p for k in (("a", "b"), ("a", "c"), ("b", "c"))]
    assert [pairs[k].p_holm for k in (("a", "b"), ("a", "c"), ("b", "c"))] == pytest.approx(holm(raw))
    assert ac.significant and not pairs[("a", "b")].significant


def test_log_scale_for_perplexity():
    y = {"a": [10.0, 10.5, 9.8], "b": [12.0, 12.4, 11.9]}
    d = decompose(y, log=True)
    dl = decompose({k: list(np.log(v)) for k, v in y.items()})
    assert d.f == pytest.approx(dl.f) and d.seed_sd == pytest.approx(dl.seed_sd) and d.log
    (p,) = pairwise(y, log=True)
    assert p.ratio == pytest.approx(math.exp(np.log(y["a"]).mean() - np.log(y["b"]).mean()))
    assert p.ratio_ci[0] < p.ratio < p.ratio_ci[1] < 1


def test_large_sample_estimates_and_intervals_cover_the_truth():
    rng = np.random.default_rng(0)
    source_sd, seed_sd = 1.0, 0.5
    y = {f"s{i}": list(rng.normal(rng.normal(0, source_sd), seed_sd, 40)) for i in range(60)}
    d = decompose(y)
    assert d.seed_sd == pytest.approx(seed_sd, rel=0.05) and d.source_sd == pytest.approx(source_sd, rel=0.25)
    assert d.seed_sd_ci[0] <= seed_sd <= d.seed_sd_ci[1] and d.source_sd_ci[0] <= source_sd <= d.source_sd_ci[1]
    share = source_sd**2 / (source_sd**2 + seed_sd**2)
    assert d.source_share_ci[0] <= share <= d.source_share_ci[1] and d.p < 1e-10


def test_interval_coverage_in_the_default_study_shape():
    """4 sources x 3 seeds: the share and seed-SD intervals are exact (about 95% coverage); the
    source-SD interval (ratio interval times MSW) must not be optimistic."""
    rng = np.random.default_rng(1)
    source_sd, seed_sd, reps = 0.03, 0.02, 600
    share = source_sd**2 / (source_sd**2 + seed_sd**2)
    hits = np.zeros(3)
    for _ in range(reps):
        d = decompose({s: list(rng.normal(rng.normal(0, source_sd), seed_sd, 3)) for s in SOURCES})
        hits += [
            d.seed_sd_ci[0] <= seed_sd <= d.seed_sd_ci[1],
            d.source_share_ci[0] <= share <= d.source_share_ci[1],
            d.source_sd_ci[0] <= source_sd <= d.source_sd_ci[1],
        ]
    cov = hits / reps
    assert abs(cov[0] - 0.95) < 0.03 and abs(cov[1] - 0.95) < 0.03 and cov[2] > 0.92


# ---------------------------------------------------------------- findings


def _ppl(rng, means: dict[str, float], noise: float) -> dict[str, list[float]]:
    return {s: [m * math.exp(rng.normal(0, noise)) for _ in SEEDS] for s, m in means.items()}


def test_seeds_that_disagree_state_no_finding():
    rng = np.random.default_rng(2)
    # the sources differ by 1%, the seeds by 10%
    y = _ppl(rng, {"wikipedia": 40.0, "news": 40.4, "pydocs": 40.2, "zh-news": 40.6}, 0.10)
    out = source_findings(y, "wikipedia", lower_is_better=True, log=True, test="ppl wikipedia")
    assert not any(f["finding"] for f in out)
    assert out[0]["kind"] == "within_seed_spread" and "within the seed spread" in out[0]["text"]
    assert clear_best(y, True, log=True) is None


def test_clear_source_effect_states_the_iid_finding():
    rng = np.random.default_rng(3)
    y = _ppl(rng, {"wikipedia": 30.0, "news": 36.0, "pydocs": 45.0, "zh-news": 60.0}, 0.005)
    (f,) = source_findings(y, "wikipedia", lower_is_better=True, log=True, test="ppl wikipedia")
    assert f["finding"] and f["kind"] == "iid_best" and f["source"] == "wikipedia" and f["closest"] == "news"
    assert f["text"].startswith("I.I.D. calibration (wikipedia) is best for ppl wikipedia") and "ratio 0.8" in f["text"]
    assert clear_best(y, True, log=True) == "wikipedia"


def test_significant_pairs_without_iid_best():
    rng = np.random.default_rng(4)
    y = _ppl(rng, {"wikipedia": 36.0, "news": 30.0, "pydocs": 45.0, "zh-news": 60.0}, 0.005)
    out = source_findings(y, "wikipedia", lower_is_better=True, log=True, test="ppl wikipedia")
    assert all(f["finding"] and f["kind"] == "pair" for f in out) and not any("I.I.D." in f["text"] for f in out)
    assert {(f["winner"], f["loser"]) for f in out} >= {("news", "wikipedia"), ("wikipedia", "pydocs")}
    # accuracy: higher is better, differences in the units given
    acc = {"a": [60.0, 60.2, 59.9], "b": [50.0, 50.1, 49.8]}
    (f,) = source_findings(acc, None, lower_is_better=False)
    assert (f["winner"], f["loser"]) == ("a", "b") and f["diff"] == pytest.approx(10.0666, abs=1e-3)


def test_one_seed_per_source_states_no_finding_and_says_why():
    y = {"wikipedia": [30.0], "news": [36.0], "pydocs": [45.0]}
    d = decompose(y, log=True)
    assert not d.testable and not d.significant and "fewer than 2 seeds" in d.reason
    (f,) = source_findings(y, "wikipedia", lower_is_better=True, log=True, test="ppl wikipedia")
    assert not f["finding"] and f["kind"] == "untestable" and "no replication" in f["text"]
    assert all(p.p is None and not p.significant for p in pairwise(y, log=True))
    # seeds that change nothing are not replicates either
    same = {"a": [30.0, 30.0], "b": [31.0, 31.0]}
    assert not decompose(same).testable and "same value" in decompose(same).reason


# ---------------------------------------------------------------- the report


def _cell(method, wbits, calib, seed, metrics):
    return {
        "model": {"name": "m"},
        "method": method,
        "wbits": wbits,
        "recipe": None if method == "fp" else {},
        "calib": None if calib is None else {"source": calib, "seed": seed},
        "label": f"{method}/{calib}/{seed}",
        "key": f"{method}{calib}{seed}",
        "status": "done",
        "metrics": metrics,
        "samples": {},
        "error": None,
        "calib_manifest": None,
        "quant_seconds": 1.0,
        "eval_seconds": 1.0,
    }


def synthetic_multi_seed(seeds=SEEDS) -> dict:
    """GPTQ: each source clearly best on its own text (seed noise 0.3%); AWQ: sources within 1%,
    seed noise 8%."""
    from quantshift.studies.spec import EvalUnit, study_from_dict

    spec = study_from_dict(
        {
            "name": "w3-sources",
            "models": ["m"],
            "methods": [
                {"method": "gptq", "wbits": [3], "group_size": 64},
                {"method": "awq", "wbits": [3], "group_size": 64},
            ],
            "calibration": {"sources": SOURCES, "seeds": list(seeds)},
            "evaluation": {"ppl": SOURCES},
        }
    )
    units = [EvalUnit("ppl", s) for s in SOURCES]
    rng = np.random.default_rng(5)
    base = {"wikipedia": 30.0, "news": 35.0, "pydocs": 12.0, "zh-news": 80.0}
    cells = [
        _cell("fp", 16, None, None, {f"ppl:{t}": {"ppl": v * 0.7} for t, v in base.items()}),
        _cell("rtn", 3, None, None, {f"ppl:{t}": {"ppl": v * 1.6} for t, v in base.items()}),
    ]
    for method, own, shift, noise in (("gptq", 0.85, 0.0, 0.003), ("awq", 1.0, 0.01, 0.08)):
        for i, src in enumerate(SOURCES):
            for seed in seeds:
                cells.append(
                    _cell(
                        method,
                        3,
                        src,
                        seed,
                        {
                            f"ppl:{t}": {
                                "ppl": v * (own if t == src else 1.0) * (1 + shift * i) * math.exp(rng.normal(0, noise))
                            }
                            for t, v in base.items()
                        },
                    )
                )
    return {"spec": spec, "units": units, "cells": cells, "diagnostics": {}, "versions": {}}


def test_report_decomposes_source_vs_seed(tmp_path):
    from quantshift.studies.document import to_markdown
    from quantshift.studies.report import build_blocks

    md = to_markdown(build_blocks(synthetic_multi_seed(), tmp_path))
    section = md.split("### Calibration source vs seed")[1].split("### Sensitivity")[0]
    print(section)
    table = section.split("### Source findings")[0]
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in table.splitlines()
        if line.startswith(("| gptq", "| awq"))
    }
    assert all("source effect" in rows[("gptq W3", f"ppl {s}")] for s in SOURCES)
    assert all("within seed spread" in rows[("awq W3", f"ppl {s}")] for s in SOURCES)
    assert all(f"| gptq W3 | ppl {s} | I.I.D. calibration ({s}) is best for ppl {s}" in section for s in SOURCES)
    assert "| awq W3 |" not in section.split("### Source findings")[1]
    assert "No finding (source effect within the seed spread): awq W3 ppl wikipedia" in section
    # matrices: mean ± SD over seeds; bold only where the seed spread supports it
    matrices = md.split("## Calibration x test matrices")[1].split("## Findings")[0]
    gptq, awq = matrices.split("### m · gptq W3")[1].split("### m · awq W3")
    assert "seeds 42, 567, 1234" in gptq and "**25.5" in gptq and "±" in gptq and "(best, n.s.)" not in gptq
    assert "**" not in awq.replace("*fp (no calibration)*", "").replace("*rtn W3 (no calibration)*", "")
    assert "(best, n.s.)" in awq and "Note: (best, n.s.)" in awq
    assert "single seed" not in md.lower().split("## calibration–test diagnostics")[0].replace("single values", "")
    for fig in ("sensitivity.png", "calibration-matrix.png", "source-vs-seed.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_report_with_one_seed_of_several_left_states_no_finding(tmp_path):
    """Seeds in the study but one seed's cells alone done for a source: untested, never a single-seed finding."""
    from quantshift.studies.document import to_markdown
    from quantshift.studies.report import build_blocks

    col = synthetic_multi_seed()
    col["cells"] = [
        c for c in col["cells"] if not (c["calib"] and c["calib"]["source"] == "news" and c["calib"]["seed"] != 42)
    ]
    md = to_markdown(build_blocks(col, tmp_path))
    assert "not testable: no replication: fewer than 2 seeds for news (1)" in md
    assert "I.I.D. calibration (" not in md and "(best, untested)" in md and "25.49 (n=1)" not in md


def test_single_seed_report_is_labelled(tmp_path):
    from quantshift.studies.document import to_markdown
    from quantshift.studies.report import build_blocks

    col = synthetic_multi_seed(seeds=[42])
    md = to_markdown(build_blocks(col, tmp_path))
    assert "### I.I.D. vs other calibration sources (single seed: not tested against seed noise)" in md
    assert "Calibration source vs seed" not in md and "· seed 42 · perplexity" in md


def test_seed_agreement_is_kendall_tau_b_with_ties_in_the_denominator():
    """The report prints "Kendall τ": with a tie, tau-b is 2/sqrt(6), not Goodman-Kruskal's gamma (1.0)."""
    from quantshift.studies.diagnostics import kendall_tau, spearman

    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [5, 5, 5]) is None and kendall_tau([1], [1]) is None
    assert spearman([1, 2, 3, 4], [1, 1, 2, 3]) == pytest.approx(stats.spearmanr([1, 2, 3, 4], [1, 1, 2, 3]).statistic)
    assert spearman([1, 2, 3], [7, 7, 7]) is None and spearman([1, 2], [2, 1]) is None


def _planted(slope: float, n: int = 600, seed: int = 3):
    """Items of uniform difficulty; the quantized model loses an item the reference gets right with
    probability 0.1 + slope x difficulty."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(n)]
    diff = dict(zip(ids, rng.uniform(0, 1, n)))
    ref = {i: 1.0 for i in ids}
    quant = {i: float(rng.uniform() >= 0.1 + slope * diff[i]) for i in ids}
    return diff, ref, quant


def test_difficulty_regression_finds_a_planted_slope_and_none_where_there_is_none():
    from quantshift.evaluation.difficulty import drop_vs_difficulty, item_difficulty

    fit = drop_vs_difficulty(*_planted(0.5))
    assert fit.significant and fit.ci[0] < 0.5 < fit.ci[1] and fit.slope > 0.3
    assert fit.verdict().startswith("harder items lose more")
    flat = drop_vs_difficulty(*_planted(0.0))
    assert not flat.significant and flat.ci[0] < 0 < flat.ci[1]
    assert flat.verdict().startswith("no significant relation")
    # difficulty from the references' correctness: wrong for both -> 1, right for both -> 0
    assert item_difficulty([{"a": 1, "b": 0, "c": 1}, {"a": 1, "b": 0, "c": 0, "d": 1}]) == {
        "a": 0.0,
        "b": 1.0,
        "c": 0.5,
    }
    same = drop_vs_difficulty({"a": 0.5, "b": 0.5, "c": 0.5}, {"a": 1, "b": 1, "c": 0}, {"a": 0, "b": 1, "c": 0})
    assert math.isnan(same.slope) and not same.significant
    with pytest.raises(ValueError, match="at least 3 shared items"):
        drop_vs_difficulty({"a": 0.1}, {"a": 1}, {"a": 0})


def test_source_vs_seed_figure_puts_sds_on_a_log_axis(tmp_path, monkeypatch):
    """A seed SD of a fraction of a percent beside a source SD of thousands of percent: both visible."""
    from quantshift.studies import figures

    rng = np.random.default_rng(0)
    y = {
        s: list(np.log(m) + rng.normal(0, 1e-3, 3))
        for s, m in (("wikipedia", 20.0), ("news", 30.0), ("zh-news", 900.0))
    }
    a = {"model": "m", "method": "gptq", "wbits": 3, "test": "ppl:news", "decomposition": decompose(y, log=True)}
    from matplotlib.figure import Figure

    scales = []
    real_save = Figure.savefig
    monkeypatch.setattr(
        Figure,
        "savefig",
        lambda fig, *a, **k: (scales.extend(ax.get_xscale() for ax in fig.axes), real_save(fig, *a, **k)),
    )
    assert figures.source_seed_figure([a], tmp_path / "f.png") and (tmp_path / "f.png").stat().st_size > 0
    assert scales == ["symlog"]
