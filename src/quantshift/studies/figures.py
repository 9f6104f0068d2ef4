"""The report's figures (matplotlib, written by plotting.save_figure with their captions):
sensitivity bars, the calibration x test heatmaps, source vs seed SDs."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .analysis import is_iid_name, mean_present, test_label, tied_with_best
from .plotting import pyplot, save_figure
from .tables import IID_MARK, fmt_seeds, sd_in_shown_unit


def sensitivity_figure(sens: list[dict], path: Path) -> bool:
    """Bars per test set: fp (with its 95% CI for tasks) and each bit width's mean over its cells,
    whiskers from the min to the max of those cells (methods x calibration sets x seeds)."""
    plt = pyplot()
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
    save_figure(
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


def _heat_panel(
    a_by_col: dict[str, dict], srcs: list[str], cols: list[str], multi: bool
) -> tuple[list[list[float]], list[list[str]], list[list[bool]]]:
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
            means = {
                x: mean_present([math.log(v) for v in vs]) if ppl else mean_present(vs)
                for x, vs in a["y"].items()
                if vs
            }
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


def calibration_matrix_figure(analyses: list[dict], path: Path, multi: bool) -> bool:
    """Per (model, method, bits): calibration x test values annotated in each cell, coloured by
    the distance from the column's best calibration (a colour bar per panel, one scale per kind
    of test across methods). Several seeds: cells
    not significantly different from the column's best are hatched (and n.s. columns labelled);
    one seed: the title says the differences were not tested against seed noise."""
    plt = pyplot()
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
    save_figure(fig, path, caption)
    return True


def _col_tag(a: dict, multi: bool) -> str:
    dec = a["decomposition"]
    if not multi:
        return ""
    return " (untested)" if not dec.testable else ("" if dec.significant else " (n.s.)")


def source_seed_figure(analyses: list[dict], path: Path) -> bool:
    """Source SD and seed SD of every testable column, with their 95% CIs; columns whose source
    effect is not significant are drawn hollow and labelled n.s."""
    plt = pyplot()
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
                x, lo, hi = (sd_in_shown_unit(v, d.log) for v in (sd, *ci))
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
    save_figure(
        fig,
        path,
        "Points: estimated SDs; whiskers: 95% CIs. Hollow source SD and (n.s.): the source effect is not "
        "significant against the seed spread (F test, p >= 0.05). Columns with no replication are not drawn.",
    )
    return True
