"""The study report: calibration x test matrices, computed findings, diagnostics, figures.

Built as a list of blocks (headings, paragraphs, tables, images) rendered twice, to Markdown and to
one self-contained HTML file (figures inlined as base64). Everything in it comes from cached
results, in a fixed order, with fixed float formats: rerunning a finished study rewrites the same
bytes. (Wall-clock times of a run go to timings.json, not into the report.)
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import defaultdict
from pathlib import Path
from ..checkpoint import write_json_atomic
from ..evaluation.stats import sign_flip_p
from .diagnostics import kendall_tau, spearman
from .spec import short_source

Block = tuple  # ("h1"|"h2"|"h3"|"p", text) | ("table", headers, rows) | ("img", path, alt)
IID_MARK = "†"
ALPHA = 0.05


# ---------------------------------------------------------------- small pure helpers

def is_iid(calib_source: str, test_key: str) -> bool:
    """A calibration source is I.I.D. for a test set when both are the same source or task."""
    import fnmatch

    kind, rest = test_key.split(":", 1)
    name = rest.split("@")[0]
    if kind == "ppl":
        return calib_source == name
    return calib_source.startswith("task:") and fnmatch.fnmatchcase(name, calib_source[5:])


def value(metric: dict | None, test_key: str) -> float | None:
    if not metric:
        return None
    v = metric.get("ppl") if test_key.startswith("ppl:") else metric.get("acc")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def goodness(v: float, test_key: str) -> float:
    """Higher is better for both kinds (perplexity is negated)."""
    return -v if test_key.startswith("ppl:") else v


def sample_scores(samples: list[dict], test_key: str) -> dict[str, float]:
    if test_key.startswith("ppl:"):
        return {s["id"]: -float(s["nll"]) for s in samples}
    return {s["id"]: float(s["acc"]) for s in samples if s.get("acc") is not None}


def paired_test(a: dict[str, float], b: dict[str, float]) -> tuple[float, float] | None:
    """Mean difference a - b over the items both scored, and its sign-flip p-value."""
    ids = sorted(set(a) & set(b))
    if len(ids) < 2:
        return None
    d = [a[i] - b[i] for i in ids]
    return sum(d) / len(d), sign_flip_p(d)


def fmt_value(metric: dict | None, test_key: str) -> str:
    v = value(metric, test_key)
    if v is None:
        return "–"
    if test_key.startswith("ppl:"):
        return f"{v:.2f}"
    ci = metric.get("acc_ci") if metric else None
    if ci and ci[0] is not None and ci[1] is not None:
        return f"{100 * v:.1f}±{100 * (ci[1] - ci[0]) / 2:.1f}"
    return f"{100 * v:.1f}"


def test_label(test_key: str) -> str:
    kind, rest = test_key.split(":", 1)
    return rest if kind == "task" else f"ppl {short_source(rest)}"


# ---------------------------------------------------------------- grouping

def group_cells(cells: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(model, method, wbits, seed) -> calibration source -> cell, for calibrated cells."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for c in cells:
        if c["calib"] is not None:
            out[(c["model"]["name"], c["method"], c["wbits"], c["calib"]["seed"])][c["calib"]["source"]] = c
    return dict(out)


def references(cells: list[dict], model: str, wbits: int) -> list[dict]:
    """fp and calibration-free cells of the same model (and bit width), shown as reference rows."""
    return [c for c in cells if c["model"]["name"] == model and c["calib"] is None and (c["recipe"] is None or c["wbits"] == wbits)]


def test_columns(units: list, shots: int | None) -> list[str]:
    if shots is None:
        return [u.key for u in units if u.kind == "ppl"]
    return [u.key for u in units if u.kind == "task" and u.shots == shots]


def matrix_table(group: dict[str, dict], refs: list[dict], cols: list[str]) -> tuple[list[str], list[list[str]]]:
    best: dict[str, float] = {}
    for col in cols:
        vals = [goodness(v, col) for c in group.values() if (v := value(c["metrics"].get(col), col)) is not None]
        if vals:
            best[col] = max(vals)
    rows = []
    for ref in refs:
        name = ref["method"] if ref["recipe"] is None else f"{ref['method']} W{ref['wbits']}"
        rows.append([f"*{name} (no calibration)*"]
                    + [fmt_value(ref["metrics"].get(col), col) for col in cols])
    for src, c in group.items():
        row = [short_source(src)]
        for col in cols:
            v = value(c["metrics"].get(col), col)
            s = fmt_value(c["metrics"].get(col), col) + (IID_MARK if is_iid(src, col) else "")
            if v is not None and col in best and goodness(v, col) == best[col] and len(group) > 1:
                s = f"**{s}**"
            row.append(s)
        rows.append(row)
    return ["calibration \\ test"] + [test_label(c) for c in cols], rows


# ---------------------------------------------------------------- findings

def iid_findings(cells: list[dict], units: list) -> list[dict]:
    rows = []
    for (model, method, wbits, seed), group in group_cells(cells).items():
        if len(group) < 2:
            continue
        for u in units:
            col = u.key
            vals = {s: value(c["metrics"].get(col), col) for s, c in group.items()}
            vals = {s: v for s, v in vals.items() if v is not None}
            iid = next((s for s in vals if is_iid(s, col)), None)
            if iid is None or len(vals) < 2:
                continue
            order = sorted(vals, key=lambda s: -goodness(vals[s], col))
            other = next(s for s in order if s != iid)
            boot = paired_test(sample_scores(group[iid]["samples"].get(col, []), col),
                                    sample_scores(group[other]["samples"].get(col, []), col))
            rows.append({"model": model, "method": method, "wbits": wbits, "seed": seed, "test": col,
                         "iid": iid, "best": order[0], "iid_rank": order.index(iid) + 1, "n_calib": len(order),
                         "vs": other, "delta": goodness(vals[iid], col) - goodness(vals[other], col),
                         "p": boot[1] if boot else None})
    return rows


def sensitivity(cells: list[dict], units: list) -> list[dict]:
    """Per test set and bit width: fp value and the mean drop over every quantized cell of that width."""
    task_units = [u for u in units if u.kind == "task"] or [u for u in units if u.kind == "ppl"]
    out = []
    for model in dict.fromkeys(c["model"]["name"] for c in cells):
        fp = next((c for c in cells if c["model"]["name"] == model and c["recipe"] is None), None)
        if fp is None:
            continue
        bits = sorted({c["wbits"] for c in cells if c["recipe"] is not None and c["model"]["name"] == model}, reverse=True)
        for u in task_units:
            f = value(fp["metrics"].get(u.key), u.key)
            if f is None:
                continue
            row = {"model": model, "test": u.key, "shots": u.shots, "kind": u.kind, "fp": f,
                   "category": (fp["metrics"][u.key].get("category") or "-") if u.kind == "task" else "text", "drops": {}}
            for b in bits:
                vs = [v for c in cells if c["model"]["name"] == model and c["recipe"] is not None and c["wbits"] == b
                      and (v := value(c["metrics"].get(u.key), u.key)) is not None]
                if vs:
                    mean = sum(vs) / len(vs)
                    row["drops"][b] = (f - mean) if u.kind == "task" else (mean / f - 1)
            out.append(row)
    return out


def seed_stability(cells: list[dict], units: list) -> list[dict]:
    groups = group_cells(cells)
    by_seedless: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(dict)
    for (model, method, wbits, seed), g in groups.items():
        by_seedless[(model, method, wbits)][seed] = g
    out = []
    for (model, method, wbits), seeds in by_seedless.items():
        if len(seeds) < 2:
            continue
        ss = sorted(seeds)
        for u in units:
            taus, same = [], []
            for i in range(len(ss)):
                for j in range(i + 1, len(ss)):
                    a, b = seeds[ss[i]], seeds[ss[j]]
                    srcs = [s for s in a if s in b and value(a[s]["metrics"].get(u.key), u.key) is not None
                            and value(b[s]["metrics"].get(u.key), u.key) is not None]
                    if len(srcs) < 2:
                        continue
                    va = [goodness(value(a[s]["metrics"][u.key], u.key), u.key) for s in srcs]
                    vb = [goodness(value(b[s]["metrics"][u.key], u.key), u.key) for s in srcs]
                    t = kendall_tau(va, vb)
                    if t is not None:
                        taus.append(t)
                    same.append(srcs[va.index(max(va))] == srcs[vb.index(max(vb))])
            if taus or same:
                out.append({"model": model, "method": method, "wbits": wbits, "test": u.key,
                            "tau": sum(taus) / len(taus) if taus else None, "same_best": sum(same) / len(same) if same else None})
    return out


def diag_rows(cells: list[dict], units: list, diagnostics: dict) -> list[dict]:
    """(cell, test) rows with the three diagnostics and the drop from fp (log ppl ratio / acc points)."""
    rows = []
    for c in cells:
        if c["calib"] is None:
            continue
        model = c["model"]["name"]
        fp = next((x for x in cells if x["model"]["name"] == model and x["recipe"] is None), None)
        pairs = diagnostics.get(model, {})
        for u in units:
            test_id = f"{'ppl' if u.kind == 'ppl' else 'task'}:{u.name}"
            d = pairs.get((c["calib"]["source"], c["calib"]["seed"], test_id))
            q = value(c["metrics"].get(u.key), u.key)
            f = value(fp["metrics"].get(u.key), u.key) if fp else None
            if d is None or q is None or f is None:
                continue
            drop = math.log(q / f) if u.kind == "ppl" else f - q
            rows.append({"method": c["method"], "wbits": c["wbits"], "kind": u.kind, "test": u.key,
                         "calib": c["calib"]["source"], "drop": drop, **d})
    return rows


def diag_correlations(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["wbits"], r["kind"])].append(r)
    out = []
    for (method, wbits, kind), rs in groups.items():
        corr = {m: spearman([r[m] for r in rs], [r["drop"] for r in rs]) for m in ("token_js", "hidden_dist", "range_cover")}
        # within each test set across calibration sources, then averaged: test difficulty cancels out
        within: dict[str, list[float]] = defaultdict(list)
        for t in dict.fromkeys(r["test"] for r in rs):
            sub = [r for r in rs if r["test"] == t]
            for m in corr:
                s = spearman([r[m] for r in sub], [r["drop"] for r in sub])
                if s is not None:
                    within[m].append(s)
        out.append({"method": method, "wbits": wbits, "kind": kind, "n": len(rs), "pooled": corr,
                    "within": {m: (sum(v) / len(v) if v else None) for m, v in within.items()} | {m: None for m in corr if m not in within}})
    return out


# ---------------------------------------------------------------- figures

def _fig_sensitivity(sens: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sens:
        return False
    shots = sorted({r["shots"] for r in sens})
    fig, axes = plt.subplots(len(shots), 1, figsize=(max(6, 0.9 * len(sens) / len(shots) + 3), 3.2 * len(shots)), squeeze=False)
    for ax, s in zip(axes[:, 0], shots):
        rs = sorted([r for r in sens if r["shots"] == s], key=lambda r: (r["category"], r["test"]))
        bits = sorted({b for r in rs for b in r["drops"]}, reverse=True)
        kind = rs[0]["kind"]
        width = 0.8 / (len(bits) + 1)
        xs = range(len(rs))
        fpv = [100 * r["fp"] if kind == "task" else 0.0 for r in rs]
        ax.bar([x - 0.4 + width / 2 for x in xs], fpv, width, label="fp")
        for k, b in enumerate(bits):
            vals = [(100 * (r["fp"] - r["drops"][b]) if kind == "task" else 100 * r["drops"][b]) if b in r["drops"] else 0
                    for r in rs]
            ax.bar([x - 0.4 + width * (k + 1.5) for x in xs], vals, width, label=f"W{b}")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{test_label(r['test'])}\n[{r['category']}]" for r in rs], fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("accuracy %" if kind == "task" else "ppl increase vs fp %")
        ax.set_title(f"{s}-shot" if kind == "task" else "perplexity", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return True


def _fig_heatmaps(cells: list[dict], units: list, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(k, g) for k, g in group_cells(cells).items() if len(g) > 1]
    seeds = sorted({k[3] for k, _ in groups})
    groups = [(k, g) for k, g in groups if k[3] == (seeds[0] if seeds else None)]
    if not groups:
        return False
    cols = [u.key for u in units]
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3 + 0.5 * len(cols) * n, 0.5 * max(len(g) for _, g in groups) + 2), squeeze=False)
    for ax, ((model, method, wbits, seed), g) in zip(axes[0], groups):
        srcs = list(g)
        grid = []
        for s in srcs:
            row = []
            for col in cols:
                vs = [value(g[x]["metrics"].get(col), col) for x in srcs]
                vs = [v for v in vs if v is not None]
                v = value(g[s]["metrics"].get(col), col)
                # rank within the column, 0 = best calibration for that test set
                row.append(float("nan") if v is None else sorted((goodness(x, col) for x in vs), reverse=True).index(goodness(v, col)))
            grid.append(row)
        ax.imshow(grid, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([test_label(c) for c in cols], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(srcs)))
        ax.set_yticklabels([short_source(s) for s in srcs], fontsize=7)
        for i, s in enumerate(srcs):
            for j, col in enumerate(cols):
                if is_iid(s, col):
                    ax.text(j, i, IID_MARK, ha="center", va="center", color="red", fontsize=9)
        ax.set_title(f"{method} W{wbits}: rank of calibration (0 = best)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the document

def build_blocks(collected: dict, fig_dir: Path) -> list[Block]:
    spec = collected["spec"]
    cells, units = collected["cells"], collected["units"]
    ev, cal = spec.evaluation, spec.calibration
    b: list[Block] = [("h1", f"Study: {spec.name}")]
    if spec.description:
        b.append(("p", spec.description))
    if spec.paper:
        b.append(("p", f"Protocol: {spec.paper}"))
    tasks = sorted({u.name for u in units if u.kind == "task"})
    b.append(("table", ["setting", "value"], [
        ["models", ", ".join(m.name for m in spec.models)],
        ["calibration", f"{', '.join(map(short_source, cal.sources))}; {cal.n} x {cal.seqlen} "
                        + ("tokens (token budget: same tokens per source)" if cal.mode == "tokens"
                           else f"examples ({cal.order} {cal.n} per source, each cut to {cal.seqlen} tokens, packed)")
                        + f"; seeds {', '.join(map(str, cal.seeds))}"],
        ["perplexity", f"{', '.join(map(short_source, ev.ppl)) or '-'}: held-out text, {ev.ppl_windows} windows x {ev.ppl_seqlen} tokens per source"],
        ["tasks", f"{', '.join(tasks) or '-'} (suite {ev.suite or '-'}); shots {', '.join(map(str, ev.shots))}; "
                  f"limit {ev.limit if ev.limit is not None else 'all'} items per task"],
        ["cells", f"{len(cells)} ({sum(c['status'] == 'done' for c in cells)} done, "
                  f"{sum(c['status'] == 'failed' for c in cells)} failed, {sum(c['status'] == 'pending' for c in cells)} pending)"],
        ["versions", ", ".join(f"{k} {v}" for k, v in sorted(collected["versions"].items()))],
    ]))
    b.append(("p", f"Tables: rows are calibration sets, columns test sets; {IID_MARK} = I.I.D. (calibration and test "
                   "from the same source/task); **bold** = best calibration for that test set; perplexity lower is "
                   "better, accuracy (%) higher is better, ± = half width of the 95% CI."))
    b.append(("h2", "Calibration x test matrices"))
    for (model, method, wbits, seed), group in group_cells(cells).items():
        refs = references(cells, model, wbits)
        for shots in [None] + list(ev.shots):
            cols = test_columns(units, shots)
            if not cols:
                continue
            what = "perplexity" if shots is None else f"accuracy, {shots}-shot"
            b.append(("h3", f"{Path(model).name} · {method} W{wbits} · seed {seed} · {what}"))
            headers, rows = matrix_table(group, refs, cols)
            b.append(("table", headers, rows))
    if not group_cells(cells):
        cols = [u.key for u in units]
        b.append(("table", ["cell"] + [test_label(c) for c in cols],
                  [[c["label"]] + [fmt_value(c["metrics"].get(col), col) for col in cols] for c in cells]))

    b.append(("h2", "Findings (computed)"))
    iid = iid_findings(cells, units)
    if iid:
        n_best = sum(r["iid_rank"] == 1 for r in iid)
        sig_better = sum(r["iid_rank"] == 1 and r["p"] is not None and r["p"] < ALPHA for r in iid)
        sig_worse = sum(r["iid_rank"] > 1 and r["p"] is not None and r["p"] < ALPHA for r in iid)
        b.append(("p", f"I.I.D. calibration is the best calibration in {n_best} of {len(iid)} (test set x method x bits x seed) "
                       f"comparisons; significantly better than the best other source in {sig_better}, significantly worse "
                       f"than the best source in {sig_worse} (paired sign-flip test over items/windows, p < {ALPHA}; with fewer than 6 items or windows no difference can reach it)."))
        b.append(("table", ["test", "method", "seed", "best calibration", "I.I.D. rank", "Δ vs", "Δ (I.I.D. − other)", "p"],
                  [[test_label(r["test"]), f"{r['method']} W{r['wbits']}", str(r["seed"]), short_source(r["best"]),
                    f"{r['iid_rank']}/{r['n_calib']}", short_source(r["vs"]), _fmt_delta(r["delta"], r["test"]), "–" if r["p"] is None else f"{r['p']:.3f}"] for r in iid]))
    else:
        b.append(("p", "No finished comparison of an I.I.D. calibration source with another one (none in the study, or those cells are not done yet)."))
    sens = sensitivity(cells, units)
    if sens:
        bits = sorted({x for r in sens for x in r["drops"]}, reverse=True)
        kind = sens[0]["kind"]
        unit = "accuracy points lost vs fp" if kind == "task" else "relative ppl increase vs fp"
        b.append(("h3", f"Sensitivity ({unit}, mean over methods and calibration sets)"))
        b.append(("table", ["test", "category", "fp"] + [f"W{x}" for x in bits],
                  [[test_label(r["test"]), r["category"], _fmt_abs(r["fp"], kind)] + [_fmt_drop(r["drops"].get(x), kind) for x in bits]
                   for r in sens]))
        ranked = sorted(sens, key=lambda r: -_mean(list(r["drops"].values())))
        if len(ranked) > 1:
            k = max(1, min(3, len(ranked) // 2))
            b.append(("p", f"Most sensitive: {', '.join(test_label(r['test']) for r in ranked[:k])}; least sensitive: "
                           f"{', '.join(test_label(r['test']) for r in ranked[-k:][::-1])} (mean over bit widths)."))
        cats: dict[str, list[float]] = defaultdict(list)
        for r in sens:
            cats[r["category"]].append(_mean(list(r["drops"].values())))
        if len(cats) > 1:
            order = sorted(cats, key=lambda k: -_mean(cats[k]))
            b.append(("p", "By category (most to least sensitive): " + ", ".join(f"{k} ({_fmt_drop(_mean(cats[k]), kind)})" for k in order) + "."))
        if _fig_sensitivity(sens, fig_dir / "sensitivity.png"):
            b.append(("img", "figures/sensitivity.png", "sensitivity per test set: fp vs each bit width"))
    if _fig_heatmaps(cells, units, fig_dir / "calibration-ranks.png"):
        b.append(("img", "figures/calibration-ranks.png", "rank of each calibration set per test set"))
    seeds = seed_stability(cells, units)
    b.append(("h3", "Seeds"))
    if seeds:
        taus = [r["tau"] for r in seeds if r["tau"] is not None]
        same = [r["same_best"] for r in seeds if r["same_best"] is not None]
        b.append(("p", f"Across calibration seeds {', '.join(map(str, cal.seeds))}: mean Kendall τ of the calibration ranking "
                       f"{_mean(taus):.2f} over {len(taus)} (test x method) rankings; the best calibration source is the same "
                       f"in {100 * _mean(same):.0f}% of them."))
    else:
        b.append(("p", "One calibration seed only: ranking stability across seeds not measured (see the seed-robustness preset)."))

    b.append(("h2", "Calibration–test diagnostics"))
    drows = diag_rows(cells, units, collected["diagnostics"])
    if drows:
        b.append(("p", "token_js: Jensen–Shannon divergence of token distributions (bits); hidden_dist: 1 − cosine of the fp "
                       "model's mean hidden states (averaged over layers); range_cover: share of the test set's per-channel "
                       "activation range inside the calibration set's. Drop: log(ppl_q / ppl_fp) or accuracy lost vs fp. "
                       "Spearman ρ pooled over cells, and within each test set across calibration sets (mean)."))
        b.append(("table", ["method", "test kind", "n", "ρ token_js (pooled / within)", "ρ hidden_dist", "ρ range_cover"],
                  [[f"{r['method']} W{r['wbits']}", r["kind"], str(r["n"])]
                   + [f"{_fmt_rho(r['pooled'][m])} / {_fmt_rho(r['within'][m])}" for m in ("token_js", "hidden_dist", "range_cover")]
                   for r in diag_correlations(drows)]))
        first = {}
        for r in drows:
            first.setdefault((r["calib"], r["test"]), r)
        tests = list(dict.fromkeys(r["test"] for r in drows))
        calibs = list(dict.fromkeys(r["calib"] for r in drows))
        b.append(("p", "Per pair (token_js / hidden_dist / range_cover):"))
        b.append(("table", ["calibration \\ test"] + [test_label(t) for t in tests],
                  [[short_source(c)] + [(f"{first[(c, t)]['token_js']:.3f} / {first[(c, t)]['hidden_dist']:.3f} / {first[(c, t)]['range_cover']:.2f}"
                           if (c, t) in first else "–") for t in tests] for c in calibs]))
    else:
        b.append(("p", "No diagnostics (disabled, or no calibrated cell finished)."))
    for k, err in sorted(collected.get("diag_errors", {}).items()):
        b.append(("p", f"diagnostics for {k} failed: {err}"))

    b.append(("h2", "Cells"))
    b.append(("table", ["cell", "status", "calibration tokens", "quantize s", "evaluate s", "error"],
              [[c["label"], c["status"], str((c["calib_manifest"] or {}).get("tokens", "–")),
                "–" if c["quant_seconds"] is None else f"{c['quant_seconds']:.1f}", f"{c['eval_seconds']:.1f}",
                (c["error"] or "")[:200]] for c in cells]))
    b.append(("p", "Quantize/evaluate seconds are those recorded when each result was computed (the cache keeps them)."))
    return b


def _mean(xs: list) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt_delta(d: float, test: str) -> str:
    return f"{-d:+.2f} ppl" if test.startswith("ppl:") else f"{100 * d:+.1f} pts"


def _fmt_abs(v: float, kind: str) -> str:
    return f"{100 * v:.1f}" if kind == "task" else f"{v:.2f}"


def _fmt_drop(v: float | None, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:+.1f}" if kind == "task" else f"{100 * v:+.1f}%"


def _fmt_rho(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


# ---------------------------------------------------------------- rendering

def to_markdown(blocks: list[Block]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "table":
            headers, rows = blk[1], blk[2]
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
        out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)


def to_html(blocks: list[Block], root: Path, title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f3f3f3}img{max-width:100%}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{_inline(blk[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "table":
            parts.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in blk[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in blk[2]]
            parts.append("</table>")
        elif kind == "img":
            data = base64.b64encode((root / blk[1]).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(blk[2])}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def results_json(collected: dict) -> dict:
    return {"study": collected["spec"].name, "versions": collected["versions"],
            "cells": [{k: c[k] for k in ("label", "model", "method", "wbits", "recipe", "calib", "key", "status", "metrics",
                                         "calib_manifest", "error")} for c in collected["cells"]],
            "diagnostics": {m: [{"calib": k[0], "seed": k[1], "test": k[2], **v} for k, v in sorted(pairs.items())]
                            for m, pairs in sorted(collected["diagnostics"].items())}}


def write_report(out_dir: Path, collected: dict, cache_root: Path | None = None) -> Path:
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(collected, fig_dir)
    md = to_markdown(blocks)
    _write_text(out_dir / "report.md", md)
    _write_text(out_dir / "report.html", to_html(blocks, out_dir, f"quantshift study {collected['spec'].name}"))
    write_json_atomic(out_dir / "results.json", results_json(collected))
    return out_dir / "report.md"


def _write_text(path: Path, text: str) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
