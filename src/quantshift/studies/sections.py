"""The report's sections built from the analyses (analysis.py), tables (tables.py) and figures
(figures.py), as document blocks."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .analysis import (
    ALPHA,
    diag_correlations,
    diag_rows,
    group_cells,
    iid_findings,
    mean_present,
    references,
    seed_groups,
    seed_stability,
    sensitivity,
    test_columns,
    test_label,
)
from .document import Block, Heading, Image, Paragraph, Table
from .figures import sensitivity_figure, source_seed_figure
from .records import CellResult, StudyResults
from .spec import EvalUnit, StudySpec, precision_of, short_source, unit_shots
from .tables import (
    IID_MARK,
    fmt_abs,
    fmt_delta,
    fmt_drop,
    fmt_drop_range,
    fmt_rho,
    fmt_sd,
    fmt_value,
    matrix_table,
    seed_matrix_table,
    source_verdict,
)


def seed_matrices(
    cells: list[CellResult], units: list[EvalUnit], shots_list: list[int], analyses: list[dict], seeds: list[int]
) -> list[Block]:
    """Calibration x test tables of several seeds: mean ± SD over seeds, bold only when supported."""
    b: list[Block] = [
        Paragraph(
            f"Tables: rows are calibration sets, columns test sets; {IID_MARK} = I.I.D. (calibration and test "
            f"from the same source/task). Each cell: mean ± SD over the calibration seeds ({', '.join(map(str, seeds))}; "
            "n=1 marked); perplexity (geometric mean, lower is better), accuracy % (higher is better). "
            "**Bold** = best calibration for that test set and significantly better than every other source "
            f"against the seed spread (F test of the source effect, then Holm-corrected pairwise t tests, p < {ALPHA}); "
            "(best, n.s.) = best mean but not significantly better than every other source: its lead is within "
            "the seed spread; (best, untested) = some source has fewer than 2 seeds. Reference rows "
            "(no calibration) are single values."
        ),
        Heading(2, "Calibration x test matrices"),
    ]
    for (model, method, wbits), by_src in seed_groups(cells).items():
        refs = references(cells, model, wbits)
        amap = {a["test"]: a for a in analyses if (a["model"], a["method"], a["wbits"]) == (model, method, wbits)}
        seen = sorted({s for by_seed in by_src.values() for s in by_seed})
        for shots in [None] + list(shots_list):
            cols = test_columns(units, shots)
            if not cols:
                continue
            what = "perplexity" if shots is None else f"accuracy, {shots}-shot"
            b.append(Heading(3, f"{Path(model).name} · {method} W{wbits} · seeds {', '.join(map(str, seen))} · {what}"))
            headers, rows, notes = seed_matrix_table(by_src, refs, cols, amap)
            b.append(Table(headers, rows))
            if notes:
                b.append(Paragraph("Note: " + "; ".join(_MARK_NOTES[n] for n in notes) + "."))
    return b


def source_seed_section(analyses: list[dict], seeds: list[int], fig_dir: Path) -> list[Block]:
    """The source-vs-seed table, its figure and the findings the seed spread supports."""
    b: list[Block] = [Heading(3, "Calibration source vs seed")]
    if not analyses:
        return b + [Paragraph("No column with two or more calibration sources has results yet.")]
    b.append(
        Paragraph(
            f"Per column (model, method, bits, test set): a one-way layout with calibration sources as groups and "
            f"seeds ({', '.join(map(str, seeds))}) as replicates, on log(ppl) for perplexity (SDs shown as % of ppl) and "
            "on accuracy points for tasks. Seed SD = √MSW, 95% chi-square CI; source SD = √max(0, (MSB − MSW)/n₀), "
            "its CI from the exact F-distribution interval of σ²source/σ²seed times MSW; source share = "
            "σ²source/(σ²source + σ²seed) with the same ratio interval (exact when every source has the same number "
            f'of seeds, approximate with the effective n₀ otherwise). F p: test of "no source effect" (p < {ALPHA} = '
            "source effect)."
        )
    )
    models = len({a["model"] for a in analyses})
    rows = []
    for a in analyses:
        d = a["decomposition"]
        share = (
            "–"
            if not d.testable
            else f"{100 * d.source_share:.0f}% ({100 * d.source_share_ci[0]:.0f}–{100 * d.source_share_ci[1]:.0f}%)"
            + ("" if d.exact_ci else " approx.")
        )
        rows.append(
            [
                (f"{Path(a['model']).name} · " if models > 1 else "") + f"{a['method']} W{a['wbits']}",
                test_label(a["test"]),
                " ".join(str(d.counts[s]) for s in d.counts),
                fmt_sd(d.source_sd, d.source_sd_ci, d.log),
                fmt_sd(d.seed_sd, d.seed_sd_ci, d.log),
                share,
                "–" if not d.testable else f"{d.p:.3g}",
                source_verdict(d),
            ]
        )
    b.append(
        Table(
            [
                "method",
                "test set",
                "seeds per source",
                "source SD (95% CI)",
                "seed SD (95% CI)",
                "source share of variance (95% CI)",
                "F p",
                "verdict",
            ],
            rows,
        )
    )
    if source_seed_figure(analyses, fig_dir / "source-vs-seed.png"):
        b.append(
            Image(
                "figures/source-vs-seed.png",
                "source SD vs seed SD per column with 95% CIs; n.s. = source effect within the seed spread",
            )
        )
    b.append(Heading(3, "Source findings (only where the source effect beats the seed spread)"))
    found = [(a, f) for a in analyses for f in a["findings"] if f["finding"]]
    if found:
        b.append(
            Paragraph(
                "A finding is stated only when the F test finds a source effect and the Holm-corrected pairwise t tests "
                f"(pooled seed variance) support it at p < {ALPHA}. Perplexity effects are ratios of (geometric mean) "
                "perplexities; accuracy effects are differences in points; CIs are unadjusted 95% t intervals."
            )
        )
        b.append(
            Table(
                ["method", "test", "finding"],
                [
                    [
                        (f"{Path(a['model']).name} · " if models > 1 else "") + f"{a['method']} W{a['wbits']}",
                        test_label(a["test"]),
                        f["text"],
                    ]
                    for a, f in found
                ],
            )
        )
    else:
        b.append(Paragraph("No finding: no column has a calibration-source effect larger than the seed spread."))
    none = defaultdict(list)
    for a in analyses:
        if not any(f["finding"] for f in a["findings"]):
            none[a["findings"][0]["kind"]].append(f"{a['method']} W{a['wbits']} {test_label(a['test'])}")
    why = {
        "within_seed_spread": "source effect within the seed spread",
        "no_pair": "F test significant but no pair of sources differs after Holm correction",
        "untestable": "not testable (fewer than 2 seeds for a source, or seeds that change nothing)",
    }
    for kind in ("within_seed_spread", "no_pair", "untestable"):
        if none[kind]:
            b.append(Paragraph(f"No finding ({why[kind]}): {', '.join(none[kind])}."))
    return b


def single_seed_section(cells: list[CellResult], units: list[EvalUnit]) -> list[Block]:
    """One seed per cell: I.I.D. vs the best other source, paired over items/windows only."""
    b: list[Block] = [Heading(3, "I.I.D. vs other calibration sources (single seed: not tested against seed noise)")]
    iid = iid_findings(cells, units)
    if iid:
        n_best = sum(r["iid_rank"] == 1 for r in iid)
        sig_better = sum(r["iid_rank"] == 1 and r["p"] is not None and r["p"] < ALPHA for r in iid)
        sig_worse = sum(r["iid_rank"] > 1 and r["p"] is not None and r["p"] < ALPHA for r in iid)
        b.append(
            Paragraph(
                f"Single seed: not tested against seed noise. I.I.D. calibration is the best calibration in {n_best} of "
                f"{len(iid)} (test set x method x bits x seed) comparisons; significantly better than the best other "
                f"source in {sig_better}, significantly worse than the best source in {sig_worse} (paired sign-flip "
                f"test over items/windows, p < {ALPHA}; with fewer than 6 items or windows no difference can reach it). "
                "These p-values measure test-set sampling only: a different calibration seed can change the ranking "
                "(run several seeds to test that)."
            )
        )
        b.append(
            Table(
                ["test", "method", "seed", "best calibration", "I.I.D. rank", "Δ vs", "Δ (I.I.D. − other)", "p"],
                [
                    [
                        test_label(r["test"]),
                        f"{r['method']} W{r['wbits']}",
                        str(r["seed"]),
                        short_source(r["best"]),
                        f"{r['iid_rank']}/{r['n_calib']}",
                        short_source(r["vs"]),
                        fmt_delta(r["delta"], r["test"]),
                        "–" if r["p"] is None else f"{r['p']:.3f}",
                    ]
                    for r in iid
                ],
            )
        )
    else:
        b.append(
            Paragraph(
                "No finished comparison of an I.I.D. calibration source with another one (none in the study, or those cells are not done yet)."
            )
        )
    return b


def settings_section(collected: StudyResults) -> list[Block]:
    spec = collected["spec"]
    cells, units = collected["cells"], collected["units"]
    ev, cal = spec.evaluation, spec.calibration
    b: list[Block] = [Heading(1, f"Study: {spec.name}")]
    if spec.description:
        b.append(Paragraph(spec.description))
    if spec.paper:
        b.append(Paragraph(f"Protocol: {spec.paper}"))
    tasks = sorted({u.name for u in units if u.kind == "task"})
    b.append(
        Table(
            ["setting", "value"],
            [
                ["models", ", ".join(m.name for m in spec.models)],
                [
                    "calibration",
                    f"{', '.join(map(short_source, cal.sources))}; {cal.n} x {cal.seqlen} "
                    + (
                        "tokens (token budget: same tokens per source)"
                        if cal.mode == "tokens"
                        else f"examples ({cal.order} {cal.n} per source, each cut to {cal.seqlen} tokens, packed)"
                    )
                    + f"; seeds {', '.join(map(str, cal.seeds))}",
                ],
                [
                    "perplexity",
                    f"{', '.join(map(short_source, ev.ppl)) or '-'}: held-out text, {ev.ppl_windows} windows x {ev.ppl_seqlen} tokens per source",
                ],
                [
                    "tasks",
                    f"{', '.join(tasks) or '-'} (suite {ev.suite or '-'}); shots {', '.join(map(str, ev.shots))}"
                    + (
                        f" (with the tasks' own counts: {', '.join(map(str, unit_shots(units)))})"
                        if unit_shots(units) != sorted(ev.shots) and unit_shots(units)
                        else ""
                    )
                    + "; "
                    f"limit {ev.limit if ev.limit is not None else 'all'} items per task; chat template {ev.chat_template}",
                ],
                [
                    "cells",
                    f"{len(cells)} ({sum(c['status'] == 'done' for c in cells)} done, "
                    f"{sum(c['status'] == 'failed' for c in cells)} failed, {sum(c['status'] == 'pending' for c in cells)} pending)",
                ],
                ["precision", precisions_line(spec, collected["versions"])],
                ["versions", ", ".join(f"{k} {v}" for k, v in sorted(collected["versions"].items()))],
            ],
        )
    )
    return b


def matrices_section(collected: StudyResults, analyses: list[dict], multi: bool) -> list[Block]:
    spec, cells, units = collected["spec"], collected["cells"], collected["units"]
    b: list[Block] = []
    if multi:
        b += seed_matrices(cells, units, unit_shots(units), analyses, spec.calibration.seeds)
    else:
        b.append(
            Paragraph(
                f"Tables: rows are calibration sets, columns test sets; {IID_MARK} = I.I.D. (calibration and test "
                "from the same source/task); **bold** = best calibration for that test set (single seed: not tested "
                "against seed noise); perplexity lower is better, accuracy (%) higher is better, ± = half width of "
                "the 95% CI."
            )
        )
        b.append(Heading(2, "Calibration x test matrices"))
        for (model, method, wbits, seed), group in group_cells(cells).items():
            refs = references(cells, model, wbits)
            for shots in [None] + unit_shots(units):
                cols = test_columns(units, shots)
                if not cols:
                    continue
                what = "perplexity" if shots is None else f"accuracy, {shots}-shot"
                b.append(Heading(3, f"{Path(model).name} · {method} W{wbits} · seed {seed} · {what}"))
                headers, rows = matrix_table(group, refs, cols)
                b.append(Table(headers, rows))
    if not group_cells(cells):
        cols = [u.key for u in units]
        models = list(dict.fromkeys(c["model"]["name"] for c in cells))
        for model in models:  # one table per model: token perplexities of two tokenizers never side by side
            if len(models) > 1:
                b.append(Heading(3, Path(model).name))
            b.append(
                Table(
                    ["cell"] + [test_label(c) for c in cols],
                    [
                        [c["label"]] + [fmt_value(c["metrics"].get(col), col) for col in cols]
                        for c in cells
                        if c["model"]["name"] == model
                    ],
                )
            )

    return b


def sensitivity_section(cells: list[CellResult], units: list[EvalUnit], fig_dir: Path) -> list[Block]:
    b: list[Block] = []
    sens = sensitivity(cells, units)
    if sens:
        bits = sorted({x for r in sens for x in r["drops"]}, reverse=True)
        kind = sens[0]["kind"]
        unit = "accuracy points lost vs fp" if kind == "task" else "relative ppl increase vs fp"
        b.append(Heading(3, f"Sensitivity ({unit}, mean over methods, calibration sets and seeds)"))
        b.append(
            Paragraph(
                "Each W column: the mean drop and, in brackets, the min…max over the cells behind it "
                "(methods x calibration sets x seeds); a spread, not a significance test."
            )
        )
        sens_models = list(dict.fromkeys(r["model"] for r in sens))
        for model in sens_models:  # one table per model: fp values of two tokenizers never side by side
            if len(sens_models) > 1:
                b.append(Paragraph(f"{Path(model).name}:"))
            b.append(
                Table(
                    ["test", "category", "fp"] + [f"W{x}" for x in bits],
                    [
                        [test_label(r["test"]), r["category"], fmt_abs(r["fp"], kind)]
                        + [fmt_drop_range(r, x, kind) for x in bits]
                        for r in sens
                        if r["model"] == model
                    ],
                )
            )
        ranked = sorted(sens, key=lambda r: -mean_present(list(r["drops"].values())))
        if len(ranked) > 1:
            k = max(1, min(3, len(ranked) // 2))
            b.append(
                Paragraph(
                    f"Most sensitive: {', '.join(test_label(r['test']) for r in ranked[:k])}; least sensitive: "
                    f"{', '.join(test_label(r['test']) for r in ranked[-k:][::-1])} (mean over bit widths)."
                )
            )
        cats: dict[str, list[float]] = defaultdict(list)
        for r in sens:
            cats[r["category"]].append(mean_present(list(r["drops"].values())))
        if len(cats) > 1:
            order = sorted(cats, key=lambda k: -mean_present(cats[k]))
            b.append(
                Paragraph(
                    "By category (most to least sensitive): "
                    + ", ".join(f"{k} ({fmt_drop(mean_present(cats[k]), kind)})" for k in order)
                    + "."
                )
            )
        if sensitivity_figure(sens, fig_dir / "sensitivity.png"):
            b.append(Image("figures/sensitivity.png", "sensitivity per test set: fp vs each bit width"))
    return b


def seeds_section(cells: list[CellResult], units: list[EvalUnit], seeds: list[int]) -> list[Block]:
    b: list[Block] = []
    stability = seed_stability(cells, units)
    b.append(Heading(3, "Seeds"))
    if stability:
        taus = [r["tau"] for r in stability if r["tau"] is not None]
        same = [r["same_best"] for r in stability if r["same_best"] is not None]
        b.append(
            Paragraph(
                f"Across calibration seeds {', '.join(map(str, seeds))}: mean Kendall τ of the calibration ranking "
                f"{mean_present(taus):.2f} over {len(taus)} (test x method) rankings; the best calibration source is the same "
                f"in {100 * mean_present(same):.0f}% of them."
            )
        )
    else:
        b.append(
            Paragraph(
                "One calibration seed only: ranking stability across seeds not measured (see the seed-robustness preset)."
            )
        )

    return b


def diagnostics_section(collected: StudyResults) -> list[Block]:
    cells, units = collected["cells"], collected["units"]
    b: list[Block] = []
    b.append(Heading(2, "Calibration–test diagnostics"))
    drows = diag_rows(cells, units, collected["diagnostics"])
    if drows:
        b.append(
            Paragraph(
                "token_js: Jensen–Shannon divergence of token distributions (bits); hidden_dist: 1 − cosine of the fp "
                "model's mean hidden states (averaged over layers); range_cover: share of the test set's per-channel "
                "activation range inside the calibration set's. Drop: log(ppl_q / ppl_fp) or accuracy lost vs fp. "
                "Spearman ρ pooled over cells, and within each test set across calibration sets (mean)."
            )
        )
        b.append(
            Table(
                ["method", "test kind", "n", "ρ token_js (pooled / within)", "ρ hidden_dist", "ρ range_cover"],
                [
                    [f"{r['method']} W{r['wbits']}", r["kind"], str(r["n"])]
                    + [
                        f"{fmt_rho(r['pooled'][m])} / {fmt_rho(r['within'][m])}"
                        for m in ("token_js", "hidden_dist", "range_cover")
                    ]
                    for r in diag_correlations(drows)
                ],
            )
        )
        first: dict[tuple, dict] = {}
        for r in drows:
            first.setdefault((r["calib"], r["test"]), r)
        tests = list(dict.fromkeys(r["test"] for r in drows))
        calibs = list(dict.fromkeys(r["calib"] for r in drows))
        b.append(Paragraph("Per pair (token_js / hidden_dist / range_cover):"))
        b.append(
            Table(
                ["calibration \\ test"] + [test_label(t) for t in tests],
                [
                    [short_source(c)]
                    + [
                        (
                            f"{first[(c, t)]['token_js']:.3f} / {first[(c, t)]['hidden_dist']:.3f} / {first[(c, t)]['range_cover']:.2f}"
                            if (c, t) in first
                            else "–"
                        )
                        for t in tests
                    ]
                    for c in calibs
                ],
            )
        )
    else:
        b.append(Paragraph("No diagnostics (disabled, or no calibrated cell finished)."))
    for k, err in sorted(collected.get("diag_errors", {}).items()):
        b.append(Paragraph(f"diagnostics for {k} failed: {err}"))

    return b


def cells_section(cells: list[CellResult]) -> list[Block]:
    b: list[Block] = []
    b.append(Heading(2, "Cells"))
    b.append(
        Table(
            ["cell", "status", "calibration tokens", "quantize s", "evaluate s", "error"],
            [
                [
                    c["label"],
                    c["status"],
                    str((c["calib_manifest"] or {}).get("tokens", "–")),
                    "–" if c["quant_seconds"] is None else f"{c['quant_seconds']:.1f}",
                    f"{c['eval_seconds']:.1f}",
                    (c["error"] or "")[:200],
                ]
                for c in cells
            ],
        )
    )
    b.append(
        Paragraph("Quantize/evaluate seconds are those recorded when each result was computed (the cache keeps them).")
    )
    from ..pipeline import numerics_line

    for c in cells:  # GPTQ-family Hessians that needed more damping, or fell back to RTN
        if (line := numerics_line(c.get("numerics"))) is not None:
            b.append(Paragraph(f"{c['label']}: {line}."))
    return b


def precisions_line(spec: StudySpec, versions: dict[str, str]) -> str:
    """What every model computed in (part of each result's cache key)."""
    names = {m.display: precision_of(m, versions) for m in spec.models}
    what = "; ".join(f"{m}: {p}" for m, p in names.items())
    return (
        what + " (float32 weights, Hessians and solvers; bf16 autocast = matrix products on the CPU's bf16 units)"
        if any("autocast" in p for p in names.values())
        else what
    )


_MARK_NOTES = {
    "n.s.": "(best, n.s.) = best mean, but the seed spread does not support calling it better than every other source",
    "untested": "(best, untested) = best mean; some source has fewer than 2 seeds, so nothing was tested",
}
