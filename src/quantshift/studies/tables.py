"""How the report prints numbers and builds its calibration x test tables: fixed formats, so a
rerun of a finished study writes the same bytes."""

from __future__ import annotations

import math

from ..evaluation.variance import Decomposition
from .analysis import display_names, goodness, is_iid, mean_present, seed_values, test_label, value
from .records import CellResult
from .spec import short_source

IID_MARK = "†"


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


def matrix_table(
    group: dict[str, CellResult], refs: list[CellResult], cols: list[str]
) -> tuple[list[str], list[list[str]]]:
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


def fmt_seeds(vals: list[float], test_key: str) -> str:
    """mean ± SD over seeds (perplexity: geometric mean, as the analysis is on log ppl)."""
    if not vals:
        return "–"
    ppl = test_key.startswith("ppl:")
    m = math.exp(mean_present([math.log(v) for v in vals])) if ppl else mean_present(vals)
    digits = 2 if ppl else 1
    if len(vals) < 2:
        return f"{m:.{digits}f} (n=1)"
    sd = math.sqrt(sum((v - mean_present(vals)) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ±{sd:.{digits}f}"


def seed_matrix_table(
    by_src: dict[str, dict[int, CellResult]], refs: list[CellResult], cols: list[str], analyses: dict[str, dict]
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


def source_verdict(dec: Decomposition) -> str:
    if not dec.testable:
        return f"not testable: {dec.reason}"
    if dec.significant:
        return f"source effect (p < {dec.alpha:g})"
    return "within seed spread"


def fmt_sd(sd: float, ci: tuple[float, float], log: bool) -> str:
    if math.isnan(sd):
        return "–"
    if log:
        return f"{sd_in_shown_unit(sd, True):.2f}% ({sd_in_shown_unit(ci[0], True):.2f}–{sd_in_shown_unit(ci[1], True):.2f}%)"
    return f"{sd:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"


def fmt_drop_range(r: dict, b: int, kind: str) -> str:
    s = fmt_drop(r["drops"].get(b), kind)
    if r["n"].get(b, 0) > 1:
        lo, hi = r["range"][b]
        s += f" [{fmt_drop(lo, kind)}…{fmt_drop(hi, kind)}]"
    return s


def fmt_delta(d: float, test: str) -> str:
    return f"{-d:+.2f} ppl" if test.startswith("ppl:") else f"{100 * d:+.1f} pts"


def fmt_abs(v: float, kind: str) -> str:
    return f"{100 * v:.1f}" if kind == "task" else f"{v:.2f}"


def fmt_drop(v: float | None, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:+.1f}" if kind == "task" else f"{100 * v:+.1f}%"


def fmt_rho(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


def sd_in_shown_unit(sd: float, log: bool) -> float:
    """SD on the analysed scale in the unit shown: % of ppl for log ppl, points for accuracy."""
    return 100 * (math.exp(sd) - 1) if log else sd
