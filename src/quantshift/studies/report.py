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

from ..atomic import write_json_atomic, write_text_atomic
from ..evaluation.stats import sign_flip_p
from ..evaluation.variance import clear_best, decompose, pairwise, source_findings
from .diagnostics import kendall_tau, spearman
from .plotting import pyplot as _pyplot
from .plotting import save_figure as _save
from .spec import precision_of, short_source, unit_shots

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
    return [
        c
        for c in cells
        if c["model"]["name"] == model and c["calib"] is None and (c["recipe"] is None or c["wbits"] == wbits)
    ]


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
        rows.append([f"*{name} (no calibration)*"] + [fmt_value(ref["metrics"].get(col), col) for col in cols])
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


# ---------------------------------------------------------------- several seeds: source vs seed


def seed_groups(cells: list[dict]) -> dict[tuple, dict[str, dict[int, dict]]]:
    """(model, method, wbits) -> calibration source -> seed -> cell, for calibrated cells."""
    out: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for c in cells:
        if c["calib"] is not None:
            out[(c["model"]["name"], c["method"], c["wbits"])][c["calib"]["source"]][c["calib"]["seed"]] = c
    return {k: dict(v) for k, v in out.items()}


def multi_seed(collected: dict) -> bool:
    """A study with several calibration seeds: findings must then be tested against the seed spread."""
    seeds = {c["calib"]["seed"] for c in collected["cells"] if c["calib"] is not None}
    return len(seeds) > 1 or len(set(collected["spec"].calibration.seeds)) > 1


def seed_values(by_seed: dict[int, dict], col: str) -> list[float]:
    """The column's value for each seed (in seed order); accuracy in points, perplexity as is."""
    vs = [value(by_seed[s]["metrics"].get(col), col) for s in sorted(by_seed)]
    return [v if col.startswith("ppl:") else 100 * v for v in vs if v is not None]


def display_names(sources: list[str]) -> dict[str, str]:
    """Short names when they are unique (they are what the findings' sentences use)."""
    short = {s: short_source(s) for s in sources}
    return short if len(set(short.values())) == len(short) else {s: s for s in sources}


def source_analysis(cells: list[dict], units: list, alpha: float = ALPHA) -> list[dict]:
    """For every (model, method, bits, test) column: the seeds per source, the source/seed
    decomposition (log ppl, accuracy points), the pairwise tests and the supported findings."""
    out = []
    for (model, method, wbits), by_src in seed_groups(cells).items():
        if len(by_src) < 2:
            continue
        names = display_names(list(by_src))
        for u in units:
            col = u.key
            y = {names[s]: seed_values(by_seed, col) for s, by_seed in by_src.items()}
            if not any(y.values()):
                continue
            ppl = col.startswith("ppl:")
            iid = next((names[s] for s in by_src if is_iid(s, col)), None)
            present = {s: v for s, v in y.items() if v}
            means = {s: _mean([math.log(x) for x in v]) if ppl else _mean(v) for s, v in present.items()}
            out.append(
                {
                    "model": model,
                    "method": method,
                    "wbits": wbits,
                    "test": col,
                    "y": y,
                    "names": names,
                    "iid": iid,
                    "decomposition": decompose(y, alpha, log=ppl),
                    "pairs": pairwise(y, alpha, log=ppl),
                    "best": (min if ppl else max)(means, key=lambda s: means[s]) if means else None,
                    "clear_best": clear_best(y, ppl, alpha, log=ppl),
                    "findings": source_findings(
                        y, iid, ppl, alpha, log=ppl, test=test_label(col), unit="" if ppl else " pts"
                    ),
                }
            )
    return out


def tied_with_best(a: dict, source: str) -> bool:
    """True when `source` is not shown significantly different from the column's best: the
    figure must hatch it, the table must not bold it."""
    dec = a["decomposition"]
    if not (dec.testable and dec.significant):
        return True
    if source == a["best"]:
        return a["clear_best"] is None
    pair = next(p for p in a["pairs"] if {p.a, p.b} == {source, a["best"]})
    return not pair.significant


def fmt_seeds(vals: list[float], test_key: str) -> str:
    """mean ± SD over seeds (perplexity: geometric mean, as the analysis is on log ppl)."""
    if not vals:
        return "–"
    ppl = test_key.startswith("ppl:")
    m = math.exp(_mean([math.log(v) for v in vals])) if ppl else _mean(vals)
    digits = 2 if ppl else 1
    if len(vals) < 2:
        return f"{m:.{digits}f} (n=1)"
    sd = math.sqrt(sum((v - _mean(vals)) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ±{sd:.{digits}f}"


def seed_matrix_table(
    by_src: dict[str, dict[int, dict]], refs: list[dict], cols: list[str], analyses: dict[str, dict]
) -> tuple[list[str], list[list[str]], list[str]]:
    """Calibration x test table of mean ± SD over seeds; the best mean is bold only when the
    seed spread supports it (F test and Holm pairs), otherwise marked "(best, n.s.)". Also
    returns the notes the marks need."""
    rows, notes = [], set()
    for ref in refs:
        name = ref["method"] if ref["recipe"] is None else f"{ref['method']} W{ref['wbits']}"
        rows.append([f"*{name} (no calibration)*"] + [fmt_value(ref["metrics"].get(col), col) for col in cols])
    names = display_names(list(by_src))
    for src, by_seed in by_src.items():
        row = [short_source(src)]
        for col in cols:
            s = fmt_seeds(seed_values(by_seed, col), col) + (IID_MARK if is_iid(src, col) else "")
            a = analyses.get(col)
            if a is not None and a["best"] == names[src] and len(by_src) > 1:
                if a["clear_best"] == names[src]:
                    s = f"**{s}**"
                else:
                    tag = "n.s." if a["decomposition"].testable else "untested"
                    s += f" (best, {tag})"
                    notes.add(tag)
            row.append(s)
        rows.append(row)
    return ["calibration \\ test"] + [test_label(c) for c in cols], rows, sorted(notes)


# ---------------------------------------------------------------- findings


def iid_findings(cells: list[dict], units: list) -> list[dict]:
    rows = []
    for (model, method, wbits, seed), group in group_cells(cells).items():
        if len(group) < 2:
            continue
        for u in units:
            col = u.key
            raw = {s: value(c["metrics"].get(col), col) for s, c in group.items()}
            vals: dict[str, float] = {s: v for s, v in raw.items() if v is not None}
            iid = next((s for s in vals if is_iid(s, col)), None)
            if iid is None or len(vals) < 2:
                continue
            order = sorted(vals, key=lambda s: -goodness(vals[s], col))
            other = next(s for s in order if s != iid)
            boot = paired_test(
                sample_scores(group[iid]["samples"].get(col, []), col),
                sample_scores(group[other]["samples"].get(col, []), col),
            )
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "wbits": wbits,
                    "seed": seed,
                    "test": col,
                    "iid": iid,
                    "best": order[0],
                    "iid_rank": order.index(iid) + 1,
                    "n_calib": len(order),
                    "vs": other,
                    "delta": goodness(vals[iid], col) - goodness(vals[other], col),
                    "p": boot[1] if boot else None,
                }
            )
    return rows


def sensitivity(cells: list[dict], units: list) -> list[dict]:
    """Per test set and bit width: fp value (with its CI for tasks) and the mean drop over every
    quantized cell of that width, with the min-max of those cells' drops."""
    task_units = [u for u in units if u.kind == "task"] or [u for u in units if u.kind == "ppl"]
    out = []
    for model in dict.fromkeys(c["model"]["name"] for c in cells):
        fp = next((c for c in cells if c["model"]["name"] == model and c["recipe"] is None), None)
        if fp is None:
            continue
        bits = sorted(
            {c["wbits"] for c in cells if c["recipe"] is not None and c["model"]["name"] == model}, reverse=True
        )
        for u in task_units:
            f = value(fp["metrics"].get(u.key), u.key)
            if f is None:
                continue
            ci = fp["metrics"][u.key].get("acc_ci") if u.kind == "task" else None
            row = {
                "model": model,
                "test": u.key,
                "shots": u.shots,
                "kind": u.kind,
                "fp": f,
                "fp_ci": tuple(ci) if ci and None not in ci else None,
                "category": (fp["metrics"][u.key].get("category") or "-") if u.kind == "task" else "text",
                "drops": {},
                "range": {},
                "n": {},
            }
            for b in bits:
                vs = [
                    v
                    for c in cells
                    if c["model"]["name"] == model
                    and c["recipe"] is not None
                    and c["wbits"] == b
                    and (v := value(c["metrics"].get(u.key), u.key)) is not None
                ]
                if vs:
                    drops = [(f - v) if u.kind == "task" else (v / f - 1) for v in vs]
                    mean = sum(vs) / len(vs)
                    row["drops"][b] = (f - mean) if u.kind == "task" else (mean / f - 1)
                    # the spread behind the mean: every method, calibration set and seed of that width
                    row["range"][b], row["n"][b] = (min(drops), max(drops)), len(drops)
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
                    srcs = [
                        s
                        for s in a
                        if s in b
                        and value(a[s]["metrics"].get(u.key), u.key) is not None
                        and value(b[s]["metrics"].get(u.key), u.key) is not None
                    ]
                    if len(srcs) < 2:
                        continue
                    va = [goodness(v, u.key) for s in srcs if (v := value(a[s]["metrics"][u.key], u.key)) is not None]
                    vb = [goodness(v, u.key) for s in srcs if (v := value(b[s]["metrics"][u.key], u.key)) is not None]
                    t = kendall_tau(va, vb)
                    if t is not None:
                        taus.append(t)
                    same.append(srcs[va.index(max(va))] == srcs[vb.index(max(vb))])
            if taus or same:
                out.append(
                    {
                        "model": model,
                        "method": method,
                        "wbits": wbits,
                        "test": u.key,
                        "tau": sum(taus) / len(taus) if taus else None,
                        "same_best": sum(same) / len(same) if same else None,
                    }
                )
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
            rows.append(
                {
                    "method": c["method"],
                    "wbits": c["wbits"],
                    "kind": u.kind,
                    "test": u.key,
                    "calib": c["calib"]["source"],
                    "drop": drop,
                    **d,
                }
            )
    return rows


def diag_correlations(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["wbits"], r["kind"])].append(r)
    out = []
    for (method, wbits, kind), rs in groups.items():
        corr = {
            m: spearman([r[m] for r in rs], [r["drop"] for r in rs]) for m in ("token_js", "hidden_dist", "range_cover")
        }
        # within each test set across calibration sources, then averaged: test difficulty cancels out
        within: dict[str, list[float]] = defaultdict(list)
        for t in dict.fromkeys(r["test"] for r in rs):
            sub = [r for r in rs if r["test"] == t]
            for m in corr:
                s = spearman([r[m] for r in sub], [r["drop"] for r in sub])
                if s is not None:
                    within[m].append(s)
        out.append(
            {
                "method": method,
                "wbits": wbits,
                "kind": kind,
                "n": len(rs),
                "pooled": corr,
                "within": {m: (sum(v) / len(v) if v else None) for m, v in within.items()}
                | {m: None for m in corr if m not in within},
            }
        )
    return out


# ---------------------------------------------------------------- figures


def _fig_sensitivity(sens: list[dict], path: Path) -> bool:
    """Bars per test set: fp (with its 95% CI for tasks) and each bit width's mean over its cells,
    whiskers from the min to the max of those cells (methods x calibration sets x seeds)."""
    plt = _pyplot()
    if not sens:
        return False
    shots = sorted({r["shots"] for r in sens})
    fig, axes = plt.subplots(
        len(shots), 1, figsize=(max(6, 0.9 * len(sens) / len(shots) + 3), 3.4 * len(shots) + 0.4), squeeze=False
    )
    for ax, s in zip(axes[:, 0], shots):
        rs = sorted([r for r in sens if r["shots"] == s], key=lambda r: (r["category"], r["test"]))
        bits = sorted({b for r in rs for b in r["drops"]}, reverse=True)
        kind = rs[0]["kind"]
        series = [("fp", *_fp_bars(rs))] if kind == "task" else []  # ppl: fp is the 0 line itself
        series += [(f"W{b}", *_bit_bars(rs, b, kind)) for b in bits]
        if not series:  # perplexity with no finished quantized cell
            ax.text(0.5, 0.5, "no quantized result yet", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        width = 0.8 / max(1, len(series))
        for k, (label, vals, err) in enumerate(series):
            ax.bar(
                [x - 0.4 + width * (k + 0.5) for x in range(len(rs))],
                vals,
                width,
                yerr=err,
                capsize=2,
                error_kw={"elinewidth": 0.8},
                label=label,
            )
        ax.set_xticks(list(range(len(rs))))
        ax.set_xticklabels(
            [f"{test_label(r['test'])}\n[{r['category']}]" for r in rs], fontsize=7, rotation=30, ha="right"
        )
        ax.set_ylabel("accuracy %" if kind == "task" else "ppl increase vs fp %")
        ax.set_title(f"{s}-shot" if kind == "task" else "perplexity", fontsize=9)
        ax.legend(fontsize=7)
    fp_note = "; fp whiskers: 95% CI" if any(r["kind"] == "task" for r in sens) else ""
    _save(
        fig,
        path,
        "Bars: mean over methods, calibration sets and seeds of each bit width; whiskers: min to max of those "
        f"cells (the spread, not a CI){fp_note}. No significance test is made on these bars.",
    )
    return True


def _fp_bars(rs: list[dict]) -> tuple[list[float], list[list[float]]]:
    vals = [100 * r["fp"] for r in rs]
    lo = [100 * (r["fp"] - r["fp_ci"][0]) if r["fp_ci"] else 0.0 for r in rs]
    hi = [100 * (r["fp_ci"][1] - r["fp"]) if r["fp_ci"] else 0.0 for r in rs]
    return vals, [[max(0.0, x) for x in lo], [max(0.0, x) for x in hi]]


def _bit_bars(rs: list[dict], b: int, kind: str) -> tuple[list[float], list[list[float]]]:
    """Height and whiskers (min..max of the cells) of one bit width, in the plotted unit."""
    vals, lo, hi = [], [], []
    for r in rs:
        if b not in r["drops"]:
            vals.append(float("nan"))
            lo.append(0.0)
            hi.append(0.0)
            continue
        d, (dmin, dmax) = r["drops"][b], r["range"][b]
        v, vmin, vmax = (
            (100 * (r["fp"] - d), 100 * (r["fp"] - dmax), 100 * (r["fp"] - dmin))
            if kind == "task"
            else (100 * d, 100 * dmin, 100 * dmax)
        )
        vals.append(v)
        lo.append(max(0.0, v - vmin))
        hi.append(max(0.0, vmax - v))
    return vals, [lo, hi]


def _heat_panel(a_by_col: dict[str, dict], srcs: list[str], cols: list[str], multi: bool):
    """Colour (distance from the column's best mean), text and hatching of one heatmap panel."""
    grid, text, hatch = [], [], []
    for s in srcs:
        grow, trow, hrow = [], [], []
        for col in cols:
            a = a_by_col.get(col)
            vals = a["y"].get(s) if a else None
            if a is None or not vals:
                grow.append(float("nan"))
                trow.append("–")
                hrow.append(False)
                continue
            ppl = col.startswith("ppl:")
            means = {x: _mean([math.log(v) for v in vs]) if ppl else _mean(vs) for x, vs in a["y"].items() if vs}
            m, best = means[s], means[a["best"]]
            grow.append(100 * (math.exp(m - best) - 1) if ppl else best - m)
            trow.append(
                fmt_seeds(vals, col).replace(" ±", "\n±").replace(" (n=1)", "")
                + (IID_MARK if is_iid_name(a, s, col) else "")
            )
            hrow.append(multi and tied_with_best(a, s))
        grid.append(grow)
        text.append(trow)
        hatch.append(hrow)
    return grid, text, hatch


def is_iid_name(a: dict, display: str, col: str) -> bool:
    return any(is_iid(src, col) for src, name in a["names"].items() if name == display)


def _fig_heatmaps(analyses: list[dict], path: Path, multi: bool) -> bool:
    """Per (model, method, bits): calibration x test values annotated in each cell, coloured by
    the distance from the column's best calibration (a colour bar per panel, one scale per kind
    of test across methods). Several seeds: cells
    not significantly different from the column's best are hatched (and n.s. columns labelled);
    one seed: the title says the differences were not tested against seed noise."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for a in analyses:
        groups[(a["model"], a["method"], a["wbits"])][a["test"]] = a
    if not groups:
        return False
    kinds = [k for k in ("ppl", "task") if any(t.startswith(k + ":") for g in groups.values() for t in g)]
    n_src = max(len(a["y"]) for a in analyses)
    n_col = max(sum(t.startswith(k + ":") for t in g) for g in groups.values() for k in kinds)
    fig, axes = plt.subplots(
        len(kinds),
        len(groups),
        squeeze=False,
        figsize=(len(groups) * (1.1 * n_col + 2.8), len(kinds) * (0.55 * n_src + 2.2) + 0.5),
    )
    panels = {}
    for j, ((model, method, wbits), by_col) in enumerate(groups.items()):
        srcs = list(next(iter(by_col.values()))["y"])
        for i, kind in enumerate(kinds):
            cols = [t for t in by_col if t.startswith(kind + ":")]
            if cols:
                panels[(i, j)] = (model, method, wbits, by_col, srcs, cols, *_heat_panel(by_col, srcs, cols, multi))
            else:
                axes[i][j].axis("off")
    # one colour scale per kind across methods: a small n.s. spread does not look like a large effect
    top = {
        i: max([v for (pi, _), pn in panels.items() if pi == i for r in pn[6] for v in r if not math.isnan(v)] + [1e-9])
        for i in range(len(kinds))
    }
    for (i, j), (model, method, wbits, by_col, srcs, cols, grid, text, hatch) in panels.items():
        ax, kind = axes[i][j], kinds[i]
        im = ax.imshow(grid, cmap="YlOrRd", aspect="auto", vmin=0, vmax=top[i])
        bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
        bar.set_label(
            "% ppl above the column's best" if kind == "ppl" else "accuracy points below the column's best", fontsize=7
        )
        bar.ax.tick_params(labelsize=6)
        for r, row in enumerate(text):
            for c, t in enumerate(row):
                dark = not math.isnan(grid[r][c]) and grid[r][c] > 0.6 * top[i]
                ax.text(c, r, t, ha="center", va="center", fontsize=6, color="white" if dark else "black")
                if hatch[r][c]:
                    ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey", lw=0))
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(
            [test_label(c) + _col_tag(by_col[c], multi) for c in cols], rotation=45, ha="right", fontsize=7
        )
        ax.set_yticks(range(len(srcs)))
        ax.set_yticklabels(srcs, fontsize=7)
        seeds = "mean over seeds" if multi else "single seed: not tested against seed noise"
        ax.set_title(f"{Path(model).name} · {method} W{wbits} ({seeds})", fontsize=8)
    caption = (
        f"{IID_MARK} = I.I.D. Hatched: not significantly different from the column's best (F test of the source "
        "effect or Holm pairwise test n.s.): colour differences there are within the seed spread."
        if multi
        else f"{IID_MARK} = I.I.D. One calibration seed: colour differences are not tested against seed noise."
    )
    _save(fig, path, caption)
    return True


def _col_tag(a: dict, multi: bool) -> str:
    dec = a["decomposition"]
    if not multi:
        return ""
    return " (untested)" if not dec.testable else ("" if dec.significant else " (n.s.)")


def _fig_source_seed(analyses: list[dict], path: Path) -> bool:
    """Source SD and seed SD of every testable column, with their 95% CIs; columns whose source
    effect is not significant are drawn hollow and labelled n.s."""
    plt = _pyplot()
    rows = [a for a in analyses if a["decomposition"].testable]
    kinds = [k for k in ("ppl", "task") if any(a["test"].startswith(k + ":") for a in rows)]
    if not rows:
        return False
    models = len({a["model"] for a in rows})
    fig, axes = plt.subplots(1, len(kinds), squeeze=False, figsize=(6 * len(kinds), 0.35 * len(rows) + 1.8))
    for ax, kind in zip(axes[0], kinds):
        rs = [a for a in rows if a["test"].startswith(kind + ":")]
        for i, a in enumerate(rs):
            d = a["decomposition"]
            for off, (sd, ci, colour, label) in zip(
                (-0.15, 0.15),
                ((d.source_sd, d.source_sd_ci, "C0", "source SD"), (d.seed_sd, d.seed_sd_ci, "C1", "seed SD")),
            ):
                x, lo, hi = (_sd_unit(v, d.log) for v in (sd, *ci))
                ax.errorbar(
                    [x],
                    [i + off],
                    xerr=[[x - lo], [hi - x]],
                    fmt="o",
                    color=colour,
                    capsize=2,
                    ms=4,
                    mfc=colour if d.significant else "white",
                    label=label if i == 0 else None,
                )
        ax.set_yticks(range(len(rs)))
        ax.set_yticklabels(
            [
                (f"{Path(a['model']).name} · " if models > 1 else "") + f"{a['method']} W{a['wbits']} · "
                f"{test_label(a['test'])}" + ("" if a["decomposition"].significant else " (n.s.)")
                for a in rs
            ],
            fontsize=7,
        )
        ax.invert_yaxis()
        # a seed SD of 0.1% beside a source SD of 3,600%: on a linear axis the former is a dot at 0;
        # symlog is logarithmic above 0.1 and still shows SDs and CI ends of 0
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(
            ("SD, % of perplexity (from log ppl)" if kind == "ppl" else "SD, accuracy points")
            + ", log scale above 0.1",
            fontsize=8,
        )
        ax.legend(fontsize=7)
    _save(
        fig,
        path,
        "Points: estimated SDs; whiskers: 95% CIs. Hollow source SD and (n.s.): the source effect is not "
        "significant against the seed spread (F test, p >= 0.05). Columns with no replication are not drawn.",
    )
    return True


def _sd_unit(sd: float, log: bool) -> float:
    """SD on the analysed scale in the unit shown: % of ppl for log ppl, points for accuracy."""
    return 100 * (math.exp(sd) - 1) if log else sd


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
    b.append(
        (
            "table",
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
                ["precision", _precisions(spec, collected["versions"])],
                ["versions", ", ".join(f"{k} {v}" for k, v in sorted(collected["versions"].items()))],
            ],
        )
    )
    multi = multi_seed(collected)
    analyses = source_analysis(cells, units)
    if multi:
        b += _seed_matrices(cells, units, unit_shots(units), analyses, cal.seeds)
    else:
        b.append(
            (
                "p",
                f"Tables: rows are calibration sets, columns test sets; {IID_MARK} = I.I.D. (calibration and test "
                "from the same source/task); **bold** = best calibration for that test set (single seed: not tested "
                "against seed noise); perplexity lower is better, accuracy (%) higher is better, ± = half width of "
                "the 95% CI.",
            )
        )
        b.append(("h2", "Calibration x test matrices"))
        for (model, method, wbits, seed), group in group_cells(cells).items():
            refs = references(cells, model, wbits)
            for shots in [None] + unit_shots(units):
                cols = test_columns(units, shots)
                if not cols:
                    continue
                what = "perplexity" if shots is None else f"accuracy, {shots}-shot"
                b.append(("h3", f"{Path(model).name} · {method} W{wbits} · seed {seed} · {what}"))
                headers, rows = matrix_table(group, refs, cols)
                b.append(("table", headers, rows))
    if not group_cells(cells):
        cols = [u.key for u in units]
        models = list(dict.fromkeys(c["model"]["name"] for c in cells))
        for model in models:  # one table per model: token perplexities of two tokenizers never side by side
            if len(models) > 1:
                b.append(("h3", Path(model).name))
            b.append(
                (
                    "table",
                    ["cell"] + [test_label(c) for c in cols],
                    [
                        [c["label"]] + [fmt_value(c["metrics"].get(col), col) for col in cols]
                        for c in cells
                        if c["model"]["name"] == model
                    ],
                )
            )

    b.append(("h2", "Findings (computed)"))
    if multi:
        b += _source_seed_blocks(analyses, cal.seeds, fig_dir)
    else:
        b += _single_seed_blocks(cells, units)
    sens = sensitivity(cells, units)
    if sens:
        bits = sorted({x for r in sens for x in r["drops"]}, reverse=True)
        kind = sens[0]["kind"]
        unit = "accuracy points lost vs fp" if kind == "task" else "relative ppl increase vs fp"
        b.append(("h3", f"Sensitivity ({unit}, mean over methods, calibration sets and seeds)"))
        b.append(
            (
                "p",
                "Each W column: the mean drop and, in brackets, the min…max over the cells behind it "
                "(methods x calibration sets x seeds); a spread, not a significance test.",
            )
        )
        sens_models = list(dict.fromkeys(r["model"] for r in sens))
        for model in sens_models:  # one table per model: fp values of two tokenizers never side by side
            if len(sens_models) > 1:
                b.append(("p", f"{Path(model).name}:"))
            b.append(
                (
                    "table",
                    ["test", "category", "fp"] + [f"W{x}" for x in bits],
                    [
                        [test_label(r["test"]), r["category"], _fmt_abs(r["fp"], kind)]
                        + [_fmt_drop_range(r, x, kind) for x in bits]
                        for r in sens
                        if r["model"] == model
                    ],
                )
            )
        ranked = sorted(sens, key=lambda r: -_mean(list(r["drops"].values())))
        if len(ranked) > 1:
            k = max(1, min(3, len(ranked) // 2))
            b.append(
                (
                    "p",
                    f"Most sensitive: {', '.join(test_label(r['test']) for r in ranked[:k])}; least sensitive: "
                    f"{', '.join(test_label(r['test']) for r in ranked[-k:][::-1])} (mean over bit widths).",
                )
            )
        cats: dict[str, list[float]] = defaultdict(list)
        for r in sens:
            cats[r["category"]].append(_mean(list(r["drops"].values())))
        if len(cats) > 1:
            order = sorted(cats, key=lambda k: -_mean(cats[k]))
            b.append(
                (
                    "p",
                    "By category (most to least sensitive): "
                    + ", ".join(f"{k} ({_fmt_drop(_mean(cats[k]), kind)})" for k in order)
                    + ".",
                )
            )
        if _fig_sensitivity(sens, fig_dir / "sensitivity.png"):
            b.append(("img", "figures/sensitivity.png", "sensitivity per test set: fp vs each bit width"))
    if _fig_heatmaps(analyses, fig_dir / "calibration-matrix.png", multi):
        b.append(
            (
                "img",
                "figures/calibration-matrix.png",
                "calibration x test values, coloured by the distance from each "
                "column's best calibration"
                + (
                    "; hatched = not significantly different from the best"
                    if multi
                    else " (single seed: not tested against seed noise)"
                ),
            )
        )
    seeds = seed_stability(cells, units)
    b.append(("h3", "Seeds"))
    if seeds:
        taus = [r["tau"] for r in seeds if r["tau"] is not None]
        same = [r["same_best"] for r in seeds if r["same_best"] is not None]
        b.append(
            (
                "p",
                f"Across calibration seeds {', '.join(map(str, cal.seeds))}: mean Kendall τ of the calibration ranking "
                f"{_mean(taus):.2f} over {len(taus)} (test x method) rankings; the best calibration source is the same "
                f"in {100 * _mean(same):.0f}% of them.",
            )
        )
    else:
        b.append(
            (
                "p",
                "One calibration seed only: ranking stability across seeds not measured (see the seed-robustness preset).",
            )
        )

    # across models: packed size, bits per byte, frontier, iso-memory, dimensions (studies/frontier.py)
    from .frontier import configs_of, frontier_blocks
    from .task_types import task_type_blocks

    configured = configs_of(cells, units)  # sizes and per-item tables, computed once for both sections
    b += frontier_blocks(collected, fig_dir, configured)
    # per task type (instruction-tuned evaluation: iso-size, methods, difficulty; studies/task_types.py)
    configs = configured[0]
    b += task_type_blocks(configs, cells, units, any(c.calib for c in configs))

    b.append(("h2", "Calibration–test diagnostics"))
    drows = diag_rows(cells, units, collected["diagnostics"])
    if drows:
        b.append(
            (
                "p",
                "token_js: Jensen–Shannon divergence of token distributions (bits); hidden_dist: 1 − cosine of the fp "
                "model's mean hidden states (averaged over layers); range_cover: share of the test set's per-channel "
                "activation range inside the calibration set's. Drop: log(ppl_q / ppl_fp) or accuracy lost vs fp. "
                "Spearman ρ pooled over cells, and within each test set across calibration sets (mean).",
            )
        )
        b.append(
            (
                "table",
                ["method", "test kind", "n", "ρ token_js (pooled / within)", "ρ hidden_dist", "ρ range_cover"],
                [
                    [f"{r['method']} W{r['wbits']}", r["kind"], str(r["n"])]
                    + [
                        f"{_fmt_rho(r['pooled'][m])} / {_fmt_rho(r['within'][m])}"
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
        b.append(("p", "Per pair (token_js / hidden_dist / range_cover):"))
        b.append(
            (
                "table",
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
        b.append(("p", "No diagnostics (disabled, or no calibrated cell finished)."))
    for k, err in sorted(collected.get("diag_errors", {}).items()):
        b.append(("p", f"diagnostics for {k} failed: {err}"))

    b.append(("h2", "Cells"))
    b.append(
        (
            "table",
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
        ("p", "Quantize/evaluate seconds are those recorded when each result was computed (the cache keeps them).")
    )
    from ..pipeline import numerics_line

    for c in cells:  # GPTQ-family Hessians that needed more damping, or fell back to RTN
        if (line := numerics_line(c.get("numerics"))) is not None:
            b.append(("p", f"{c['label']}: {line}."))
    return b


def _seed_matrices(
    cells: list[dict], units: list, shots_list: list[int], analyses: list[dict], seeds: list[int]
) -> list[Block]:
    """Calibration x test tables of several seeds: mean ± SD over seeds, bold only when supported."""
    b: list[Block] = [
        (
            "p",
            f"Tables: rows are calibration sets, columns test sets; {IID_MARK} = I.I.D. (calibration and test "
            f"from the same source/task). Each cell: mean ± SD over the calibration seeds ({', '.join(map(str, seeds))}; "
            "n=1 marked); perplexity (geometric mean, lower is better), accuracy % (higher is better). "
            "**Bold** = best calibration for that test set and significantly better than every other source "
            f"against the seed spread (F test of the source effect, then Holm-corrected pairwise t tests, p < {ALPHA}); "
            "(best, n.s.) = best mean but not significantly better than every other source: its lead is within "
            "the seed spread; (best, untested) = some source has fewer than 2 seeds. Reference rows "
            "(no calibration) are single values.",
        ),
        ("h2", "Calibration x test matrices"),
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
            b.append(("h3", f"{Path(model).name} · {method} W{wbits} · seeds {', '.join(map(str, seen))} · {what}"))
            headers, rows, notes = seed_matrix_table(by_src, refs, cols, amap)
            b.append(("table", headers, rows))
            if notes:
                b.append(("p", "Note: " + "; ".join(_MARK_NOTES[n] for n in notes) + "."))
    return b


_MARK_NOTES = {
    "n.s.": "(best, n.s.) = best mean, but the seed spread does not support calling it better than every other source",
    "untested": "(best, untested) = best mean; some source has fewer than 2 seeds, so nothing was tested",
}


def _verdict(dec) -> str:
    if not dec.testable:
        return f"not testable: {dec.reason}"
    if dec.significant:
        return f"source effect (p < {dec.alpha:g})"
    return "within seed spread"


def _fmt_sd(sd: float, ci: tuple[float, float], log: bool) -> str:
    if math.isnan(sd):
        return "–"
    if log:
        return f"{_sd_unit(sd, True):.2f}% ({_sd_unit(ci[0], True):.2f}–{_sd_unit(ci[1], True):.2f}%)"
    return f"{sd:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"


def _source_seed_blocks(analyses: list[dict], seeds: list[int], fig_dir: Path) -> list[Block]:
    """The source-vs-seed table, its figure and the findings the seed spread supports."""
    b: list[Block] = [("h3", "Calibration source vs seed")]
    if not analyses:
        return b + [("p", "No column with two or more calibration sources has results yet.")]
    b.append(
        (
            "p",
            f"Per column (model, method, bits, test set): a one-way layout with calibration sources as groups and "
            f"seeds ({', '.join(map(str, seeds))}) as replicates, on log(ppl) for perplexity (SDs shown as % of ppl) and "
            "on accuracy points for tasks. Seed SD = √MSW, 95% chi-square CI; source SD = √max(0, (MSB − MSW)/n₀), "
            "its CI from the exact F-distribution interval of σ²source/σ²seed times MSW; source share = "
            "σ²source/(σ²source + σ²seed) with the same ratio interval (exact when every source has the same number "
            f'of seeds, approximate with the effective n₀ otherwise). F p: test of "no source effect" (p < {ALPHA} = '
            "source effect).",
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
                _fmt_sd(d.source_sd, d.source_sd_ci, d.log),
                _fmt_sd(d.seed_sd, d.seed_sd_ci, d.log),
                share,
                "–" if not d.testable else f"{d.p:.3g}",
                _verdict(d),
            ]
        )
    b.append(
        (
            "table",
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
    if _fig_source_seed(analyses, fig_dir / "source-vs-seed.png"):
        b.append(
            (
                "img",
                "figures/source-vs-seed.png",
                "source SD vs seed SD per column with 95% CIs; n.s. = source effect within the seed spread",
            )
        )
    b.append(("h3", "Source findings (only where the source effect beats the seed spread)"))
    found = [(a, f) for a in analyses for f in a["findings"] if f["finding"]]
    if found:
        b.append(
            (
                "p",
                "A finding is stated only when the F test finds a source effect and the Holm-corrected pairwise t tests "
                f"(pooled seed variance) support it at p < {ALPHA}. Perplexity effects are ratios of (geometric mean) "
                "perplexities; accuracy effects are differences in points; CIs are unadjusted 95% t intervals.",
            )
        )
        b.append(
            (
                "table",
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
        b.append(("p", "No finding: no column has a calibration-source effect larger than the seed spread."))
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
            b.append(("p", f"No finding ({why[kind]}): {', '.join(none[kind])}."))
    return b


def _single_seed_blocks(cells: list[dict], units: list) -> list[Block]:
    """One seed per cell: I.I.D. vs the best other source, paired over items/windows only."""
    b: list[Block] = [("h3", "I.I.D. vs other calibration sources (single seed: not tested against seed noise)")]
    iid = iid_findings(cells, units)
    if iid:
        n_best = sum(r["iid_rank"] == 1 for r in iid)
        sig_better = sum(r["iid_rank"] == 1 and r["p"] is not None and r["p"] < ALPHA for r in iid)
        sig_worse = sum(r["iid_rank"] > 1 and r["p"] is not None and r["p"] < ALPHA for r in iid)
        b.append(
            (
                "p",
                f"Single seed: not tested against seed noise. I.I.D. calibration is the best calibration in {n_best} of "
                f"{len(iid)} (test set x method x bits x seed) comparisons; significantly better than the best other "
                f"source in {sig_better}, significantly worse than the best source in {sig_worse} (paired sign-flip "
                f"test over items/windows, p < {ALPHA}; with fewer than 6 items or windows no difference can reach it). "
                "These p-values measure test-set sampling only: a different calibration seed can change the ranking "
                "(run several seeds to test that).",
            )
        )
        b.append(
            (
                "table",
                ["test", "method", "seed", "best calibration", "I.I.D. rank", "Δ vs", "Δ (I.I.D. − other)", "p"],
                [
                    [
                        test_label(r["test"]),
                        f"{r['method']} W{r['wbits']}",
                        str(r["seed"]),
                        short_source(r["best"]),
                        f"{r['iid_rank']}/{r['n_calib']}",
                        short_source(r["vs"]),
                        _fmt_delta(r["delta"], r["test"]),
                        "–" if r["p"] is None else f"{r['p']:.3f}",
                    ]
                    for r in iid
                ],
            )
        )
    else:
        b.append(
            (
                "p",
                "No finished comparison of an I.I.D. calibration source with another one (none in the study, or those cells are not done yet).",
            )
        )
    return b


def _fmt_drop_range(r: dict, b: int, kind: str) -> str:
    s = _fmt_drop(r["drops"].get(b), kind)
    if r["n"].get(b, 0) > 1:
        lo, hi = r["range"][b]
        s += f" [{_fmt_drop(lo, kind)}…{_fmt_drop(hi, kind)}]"
    return s


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
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#f3f3f3}img{max-width:100%}</style></head><body>"
    ]
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


def _precisions(spec, versions: dict) -> str:
    """What every model computed in (part of each result's cache key)."""
    names = {m.display: precision_of(m, versions) for m in spec.models}
    what = "; ".join(f"{m}: {p}" for m, p in names.items())
    return (
        what + " (float32 weights, Hessians and solvers; bf16 autocast = matrix products on the CPU's bf16 units)"
        if any("autocast" in p for p in names.values())
        else what
    )


def results_json(collected: dict) -> dict:
    from .frontier import packed_bytes

    return {
        "study": collected["spec"].name,
        "versions": collected["versions"],
        "cells": [
            {
                **{
                    k: c[k]
                    for k in (
                        "label",
                        "model",
                        "method",
                        "wbits",
                        "recipe",
                        "calib",
                        "key",
                        "status",
                        "metrics",
                        "calib_manifest",
                        "numerics",
                        "error",
                    )
                },
                "packed_bytes": packed_bytes(c),
            }
            for c in collected["cells"]
        ],
        "diagnostics": {
            m: [{"calib": k[0], "seed": k[1], "test": k[2], **v} for k, v in sorted(pairs.items())]
            for m, pairs in sorted(collected["diagnostics"].items())
        },
    }


def write_report(out_dir: Path, collected: dict, cache_root: Path | None = None) -> Path:
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(collected, fig_dir)
    md = to_markdown(blocks)
    write_text_atomic(out_dir / "report.md", md)
    write_text_atomic(out_dir / "report.html", to_html(blocks, out_dir, f"quantshift study {collected['spec'].name}"))
    write_json_atomic(out_dir / "results.json", results_json(collected))
    return out_dir / "report.md"
