"""The study report's analyses, pure functions of the collected results: I.I.D. findings, source
vs seed decompositions, sensitivity per test set, seed stability, diagnostics correlations.
Accuracies are fractions, perplexities as measured; formatting is tables.py's job."""

from __future__ import annotations

import math
from collections import defaultdict

from ..evaluation.stats import sign_flip_p
from ..evaluation.variance import clear_best, decompose, pairwise, source_findings
from .diagnostics import kendall_tau, spearman
from .records import CellResult, StudyResults
from .spec import EvalUnit, short_source

ALPHA = 0.05


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


def group_cells(cells: list[CellResult]) -> dict[tuple, dict[str, CellResult]]:
    """(model, method, wbits, seed) -> calibration source -> cell, for calibrated cells."""
    out: dict[tuple, dict[str, CellResult]] = defaultdict(dict)
    for c in cells:
        if c["calib"] is not None:
            out[(c["model"]["name"], c["method"], c["wbits"], c["calib"]["seed"])][c["calib"]["source"]] = c
    return dict(out)


def references(cells: list[CellResult], model: str, wbits: int) -> list[CellResult]:
    """fp and calibration-free cells of the same model (and bit width), shown as reference rows."""
    return [
        c
        for c in cells
        if c["model"]["name"] == model and c["calib"] is None and (c["recipe"] is None or c["wbits"] == wbits)
    ]


def test_columns(units: list[EvalUnit], shots: int | None) -> list[str]:
    if shots is None:
        return [u.key for u in units if u.kind == "ppl"]
    return [u.key for u in units if u.kind == "task" and u.shots == shots]


def seed_groups(cells: list[CellResult]) -> dict[tuple, dict[str, dict[int, CellResult]]]:
    """(model, method, wbits) -> calibration source -> seed -> cell, for calibrated cells."""
    out: dict[tuple, dict[str, dict[int, CellResult]]] = defaultdict(lambda: defaultdict(dict))
    for c in cells:
        if c["calib"] is not None:
            out[(c["model"]["name"], c["method"], c["wbits"])][c["calib"]["source"]][c["calib"]["seed"]] = c
    return {k: dict(v) for k, v in out.items()}


def multi_seed(collected: StudyResults) -> bool:
    """A study with several calibration seeds: findings must then be tested against the seed spread."""
    seeds = {c["calib"]["seed"] for c in collected["cells"] if c["calib"] is not None}
    return len(seeds) > 1 or len(set(collected["spec"].calibration.seeds)) > 1


def seed_values(by_seed: dict[int, CellResult], col: str) -> list[float]:
    """The column's value for each seed (in seed order); accuracy in points, perplexity as is."""
    vs = [value(by_seed[s]["metrics"].get(col), col) for s in sorted(by_seed)]
    return [v if col.startswith("ppl:") else 100 * v for v in vs if v is not None]


def display_names(sources: list[str]) -> dict[str, str]:
    """Short names when they are unique (they are what the findings' sentences use)."""
    short = {s: short_source(s) for s in sources}
    return short if len(set(short.values())) == len(short) else {s: s for s in sources}


def source_analysis(cells: list[CellResult], units: list[EvalUnit], alpha: float = ALPHA) -> list[dict]:
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
            means = {s: mean_present([math.log(x) for x in v]) if ppl else mean_present(v) for s, v in present.items()}
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


def iid_findings(cells: list[CellResult], units: list[EvalUnit]) -> list[dict]:
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


def sensitivity(cells: list[CellResult], units: list[EvalUnit]) -> list[dict]:
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


def seed_stability(cells: list[CellResult], units: list[EvalUnit]) -> list[dict]:
    groups = group_cells(cells)
    by_seedless: dict[tuple, dict[int, dict[str, CellResult]]] = defaultdict(dict)
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


def diag_rows(cells: list[CellResult], units: list[EvalUnit], diagnostics: dict) -> list[dict]:
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


def is_iid_name(a: dict, display: str, col: str) -> bool:
    return any(is_iid(src, col) for src, name in a["names"].items() if name == display)


def mean_present(xs: list) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def test_label(test_key: str) -> str:
    kind, rest = test_key.split(":", 1)
    return rest if kind == "task" else f"ppl {short_source(rest)}"
