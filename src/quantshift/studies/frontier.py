"""The report's cross-model section: packed size, tokenizer-independent quality, the quality-size
frontier, the iso-memory question, drops per evaluation dimension and perplexity as a proxy.

Token perplexity depends on the tokenizer (a model with a larger vocabulary predicts fewer,
harder tokens), so nothing here compares it across models: quality across models is bits per
byte of held-out text (language modelling) and task accuracy, grouped into the dimensions of
evaluation.tasks.DIMENSIONS. A *configuration* is (model, method, bit width[, calibration
source]); its seeds are its quantized models. The statistics are evaluation.pareto's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..evaluation.pareto import (
    Candidate,
    Comparison,
    PackedSize,
    Quality,
    Stratum,
    WeightFormat,
    compare,
    estimate,
    interval,
    iso_memory_pairs,
    packed_size_bytes,
    pareto_front,
    spearman_ci,
)
from ..evaluation.tasks import DIMENSIONS, LANGUAGE_MODELLING, dimension_of
from .document import Block, Heading, Image, Paragraph, Table
from .records import CellResult, StudyResults
from .spec import EvalUnit, short_source

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LM = LANGUAGE_MODELLING
ALL_TASKS = "all tasks"


# ---------------------------------------------------------------- sizes


@cache
def param_shapes(model_name: str) -> dict[str, tuple[int, ...]] | None:
    """Every parameter's shape (tied weights once), from the model's config on the meta device:
    no weights are read. None when the config cannot be found on this machine."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..models.load import model_path

        cfg = AutoConfig.from_pretrained(model_path(model_name))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        return {n: tuple(p.shape) for n, p in model.named_parameters()}
    except Exception:  # an unreachable hub id, a removed directory: the size is then unknown
        return None


def cell_size(cell: CellResult) -> tuple[PackedSize | None, str]:
    """Packed size of a cell's model (fp: every parameter at 16 bits), or None and why not."""
    shapes = param_shapes(cell["model"]["name"])
    if shapes is None:
        return None, "model config not found"
    if cell["recipe"] is None:
        return packed_size_bytes(shapes, {}), ""
    recorded = cell.get("weight_formats")
    if recorded is None:
        return None, "quantized before formats were recorded (fresh cache needed)"
    formats = {
        m: WeightFormat(f["bits"], f["group_size"], f["sym"], f.get("measured_bits"), f.get("dtype", "int"))
        for m, f in recorded.items()
    }
    try:
        return packed_size_bytes(shapes, formats), ""
    except ValueError as err:
        return None, str(err)


def packed_bytes(cell: CellResult) -> int | None:
    """A cell's packed size in bytes (None when unknown), for results.json."""
    size, _why = cell_size(cell)
    return None if size is None else size.total_bytes


# ---------------------------------------------------------------- configurations and qualities


@dataclass
class Config:
    model: str
    display: str
    method: str
    wbits: int
    calib: str | None
    cells: list[CellResult] = field(default_factory=list)
    size: PackedSize | None = None
    size_note: str = ""
    quality: dict[str, Quality] = field(default_factory=dict)

    @property
    def fp(self) -> bool:
        return self.method == "fp" and self.wbits == 16 and self.cells[0]["recipe"] is None

    def label(self, with_model: bool = True, with_calib: bool = False) -> str:
        what = "fp16" if self.fp else f"{self.method} W{self.wbits}"
        cal = f" · {short_source(self.calib)}" if with_calib and self.calib else ""
        return (f"{self.display} · " if with_model else "") + what + cal

    @property
    def key(self) -> str:
        return f"{self.model}|{self.method}|{self.wbits}|{self.calib}"


def _window_bits(samples: list[dict]) -> dict[str, tuple[float, float]]:
    return {
        s["id"]: (s["nll"] * s["tokens"] / math.log(2), float(s["bytes"]))
        for s in samples
        if s.get("bytes") and s.get("tokens")
    }


def _item_scores(samples: list[dict]) -> dict[str, tuple[float, float]]:
    return {s["id"]: (float(s["acc"]), 1.0) for s in samples if s.get("acc") is not None}


def stratum(cells: list[CellResult], key: str) -> Stratum | None:
    """[seeds x items] table of one unit over a configuration's cells (items all seeds scored)."""
    extract = _window_bits if key.startswith("ppl:") else _item_scores
    rows = [r for c in cells if (r := extract(c["samples"].get(key) or []))]
    if not rows:
        return None
    ids = [i for i in rows[0] if all(i in r for r in rows[1:])]
    if not ids:
        return None
    return Stratum(
        np.array([[r[i][0] for i in ids] for r in rows]), np.array([[r[i][1] for i in ids] for r in rows]), tuple(ids)
    )


def task_categories(cells: list[CellResult], units: list[EvalUnit]) -> dict[str, str | None]:
    """Task unit key -> the suite's category for it, else the one recorded with its results (None when none was)."""
    return {
        u.key: u.category or next((c["metrics"][u.key].get("category") for c in cells if c["metrics"].get(u.key)), None)
        for u in units
        if u.kind == "task"
    }


def task_dimensions(cells: list[CellResult], units: list[EvalUnit]) -> dict[str, str]:
    """Task unit key -> dimension (from the category recorded with the results)."""
    return {k: dimension_of(cat) for k, cat in task_categories(cells, units).items()}


def metric_names(dims: dict[str, str], units: list[EvalUnit]) -> list[str]:
    names = [LM] if any(u.kind == "ppl" for u in units) else []
    present = [d for d in [*DIMENSIONS, "unassigned"] if d in dims.values()]
    names += present
    if dims:
        names.append(ALL_TASKS)
    return names


def higher_better(metric: str) -> bool:
    return metric != LM


def configs_of(cells: list[CellResult], units: list[EvalUnit]) -> tuple[list[Config], dict[str, str]]:
    multi_calib = len({c["calib"]["source"] for c in cells if c["calib"]}) > 1
    groups: dict[tuple, Config] = {}
    for c in cells:
        if c["status"] != "done":
            continue
        calib = c["calib"]["source"] if (c["calib"] and multi_calib) else None
        k = (c["model"]["name"], c["method"], c["wbits"], calib)
        if k not in groups:
            groups[k] = Config(k[0], c["model"].get("label") or Path(k[0]).name or k[0], c["method"], c["wbits"], calib)
        groups[k].cells.append(c)
    dims = task_dimensions(cells, units)
    configs = list(groups.values())
    for cfg in configs:
        cfg.size, cfg.size_note = cell_size(cfg.cells[0])
        keys = {LM: [u.key for u in units if u.kind == "ppl"], ALL_TASKS: list(dims)}
        for d in set(dims.values()):
            keys[d] = [k for k, v in dims.items() if v == d]
        for metric in metric_names(dims, units):
            q = {k: s for k in keys[metric] if (s := stratum(cfg.cells, k)) is not None}
            if q:
                cfg.quality[metric] = q
    return configs, dims


# ---------------------------------------------------------------- formatting


def _fmt_q(v: float, metric: str) -> str:
    if math.isnan(v):
        return "–"
    return f"{v:.3f}" if metric == LM else f"{100 * v:.1f}"


def _fmt_ci(v: float, ci: tuple[float, float], metric: str) -> str:
    if math.isnan(ci[0]):
        return _fmt_q(v, metric)
    return f"{_fmt_q(v, metric)} [{_fmt_q(ci[0], metric)}, {_fmt_q(ci[1], metric)}]"


def _fmt_diff(c: Comparison | None, metric: str) -> str:
    if c is None:
        return "–"
    f = (lambda x: f"{x:+.3f}") if metric == LM else (lambda x: f"{100 * x:+.1f}")
    return f"{f(c.diff)} [{f(c.ci[0])}, {f(c.ci[1])}]" + (" *" if c.significant else "")


def _mb(size: PackedSize | None) -> str:
    return "–" if size is None else f"{size.total_bytes / 1e6:.3g}"


def _unit(metric: str) -> str:
    return "bits per byte, lower is better" if metric == LM else "accuracy %, higher is better"


# ---------------------------------------------------------------- the section


def frontier_blocks(
    collected: StudyResults, fig_dir: Path, configured: tuple[list[Config], dict[str, str]] | None = None
) -> list[Block]:
    """The cross-model section of the report (empty when no cell has finished); `configured`:
    configs_of(cells, units) when the caller has it already."""
    cells, units = collected["cells"], collected["units"]
    configs, dims = configured or configs_of(cells, units)
    if not configs:
        return []
    metrics = metric_names(dims, units)
    multi_calib = any(c.calib for c in configs)
    b: list[Block] = [
        Heading(2, "Size, quality and evaluation dimensions (across models)"),
        Paragraph(
            "Different tokenizers cut the same text into different tokens, so token perplexity is not "
            "comparable across models and is never compared across models here (it appears only in the "
            "per-model tables above). Across models this section uses bits per byte (bpb = total NLL in "
            "nats / (ln 2 × UTF-8 bytes of exactly the scored text: each scored token owns the text from "
            "the end of the previous token to its own end)) and task accuracy. Packed size = bytes a "
            "packed export stores: quantized weights as codes + one fp16 scale per group (+ a zero point "
            "per group for asymmetric grids), every other parameter (embeddings, norms, unquantized "
            "layers) at 16 bits, tied weights once; fp16 = the unquantized model at 16 bits. "
            "MB = 10⁶ bytes. Intervals: 95% percentile bootstrap over held-out windows / task items "
            "and over calibration seeds where a configuration has several."
        ),
    ]
    if dims:
        used = defaultdict(list)
        for k, d in dims.items():
            used[d].append(k.split(":", 1)[1].split("@")[0])
        b.append(
            Paragraph(
                "Dimensions (evaluation.tasks.DIMENSIONS): "
                + "; ".join(f"{d}: {', '.join(ts)}" for d, ts in sorted(used.items()))
                + f"; {LM}: bits per byte on the held-out sources."
            )
        )
    b += _table_blocks(configs, metrics, units, multi_calib)
    b += _frontier_section(configs, metrics, fig_dir, multi_calib)
    b += _iso_memory_section(configs, metrics, multi_calib)
    b += _drops_section(configs, metrics, multi_calib)
    b += _proxy_section(configs, dims, fig_dir)
    return b


def _table_blocks(configs: list[Config], metrics: list[str], units: list[EvalUnit], multi_calib: bool) -> list[Block]:
    sources = [u.key for u in units if u.kind == "ppl"]
    headers = (
        ["model", "configuration", "packed MB", "bits/param"]
        + [f"bpb {short_source(k[4:])}" for k in sources]
        + [f"{m} ({'bpb' if m == LM else 'acc %'})" for m in metrics]
    )
    rows = []
    for cfg in configs:
        row = [
            cfg.display,
            cfg.label(False, multi_calib),
            _mb(cfg.size),
            "–" if cfg.size is None else f"{cfg.size.bits_per_param:.2f}",
        ]
        for k in sources:
            s = cfg.quality.get(LM, {}).get(k)
            row.append("–" if s is None else f"{s.num.sum() / s.den.sum():.3f}")
        for m in metrics:
            q = cfg.quality.get(m)
            row.append("–" if not q else _fmt_ci(estimate(q), interval(q), m))
        rows.append(row)
    out: list[Block] = [Heading(3, "Packed size and tokenizer-independent quality"), Table(headers, rows)]
    notes = sorted({f"{c.label(True, multi_calib)}: {c.size_note}" for c in configs if c.size is None})
    if notes:
        out.append(Paragraph("Size unknown: " + "; ".join(notes) + "."))
    return out


def _sized(configs: list[Config], metric: str) -> list[Config]:
    return [c for c in configs if c.size is not None and c.quality.get(metric)]


def _frontier_section(configs: list[Config], metrics: list[str], fig_dir: Path, multi_calib: bool) -> list[Block]:
    b: list[Block] = [Heading(3, "Quality–size frontier")]
    fronts = {}
    for m in (LM, ALL_TASKS):
        if m not in metrics:
            continue
        cs = _sized(configs, m)
        if not cs:
            continue
        front = [
            cs[i]
            for i in pareto_front(
                [c.size.total_bytes for c in cs],  # type: ignore[union-attr]  # _sized: every size known
                [estimate(c.quality[m]) for c in cs],
                higher_better(m),
            )
        ]
        fronts[m] = (cs, front)
        b.append(
            Paragraph(
                f"{m} ({_unit(m)}): the frontier (no other configuration is as small and better) is "
                + ", ".join(
                    f"{c.label(True, multi_calib)} ({_mb(c.size)} MB, {_fmt_q(estimate(c.quality[m]), m)})"
                    for c in front
                )
                + "."
            )
        )
    if not fronts:
        return b + [Paragraph("No configuration with both a packed size and a quality yet.")]
    if _fig_frontier(fronts, fig_dir / "frontier.png", multi_calib):
        b.append(Image("figures/frontier.png", "quality against packed size; frontier configurations joined"))
    return b


def _iso_memory_section(configs: list[Config], metrics: list[str], multi_calib: bool) -> list[Block]:
    b: list[Block] = [Heading(3, "Iso-memory: a larger model at low bits or a smaller model at higher precision?")]
    params = {c.model: c.size.quantized_params + c.size.dense_params for c in configs if c.size is not None}
    if len(params) < 2:
        return b + [Paragraph("Needs two or more models with known sizes.")]
    b.append(
        Paragraph(
            "For each byte budget (each configuration's packed size) and pair of models: the best configuration "
            "of each model that fits in the budget (by point estimate), and the difference larger − smaller with "
            "its 95% bootstrap interval (bits per byte: windows of the two tokenizers are different text, "
            "resampled independently; accuracy: paired over the same task items). * = interval excludes 0. "
            "Budgets where neither pick changes are left out."
        )
    )
    rows = []
    for m in [x for x in metrics if x != "unassigned"]:
        cands = [Candidate(c.model, c.key, c.size.total_bytes, estimate(c.quality[m])) for c in _sized(configs, m)]  # type: ignore[union-attr]
        by_key = {c.key: c for c in configs}
        for r in iso_memory_pairs(cands, params, higher_better(m)):
            big, small = by_key[r["larger"].key], by_key[r["smaller"].key]
            cmp = compare(small.quality[m], big.quality[m], paired=m != LM)
            rows.append(
                [
                    m,
                    f"{r['budget'] / 1e6:.3g}",
                    f"{big.label(True, multi_calib)} ({_mb(big.size)} MB)",
                    _fmt_q(r["larger"].quality, m),
                    f"{small.label(True, multi_calib)} ({_mb(small.size)} MB)",
                    _fmt_q(r["smaller"].quality, m),
                    _fmt_diff(cmp, m),
                    _iso_verdict(cmp, m),
                ]
            )
    if not rows:
        return b + [Paragraph("No budget fits a configuration of two models.")]
    b.append(
        Table(
            [
                "quality",
                "budget MB",
                "larger model",
                "value",
                "smaller model",
                "value",
                "Δ larger − smaller [95% CI]",
                "verdict",
            ],
            rows,
        )
    )
    answers = []
    for m in dict.fromkeys(row[0] for row in rows):
        by: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            if row[0] == m:
                by[row[-1]].append(row[1])
        answers.append(f"{m}: " + "; ".join(f"{v} at {', '.join(bs)} MB" for v, bs in by.items()))
    b.append(Paragraph("Answer per quality: " + ". ".join(answers) + "."))
    return b


def _iso_verdict(c: Comparison | None, metric: str) -> str:
    if c is None:
        return "no common items"
    if not c.significant:
        return "no significant difference"
    better_big = c.diff < 0 if metric == LM else c.diff > 0
    return "larger model better" if better_big else "smaller model better"


def _drops_section(configs: list[Config], metrics: list[str], multi_calib: bool) -> list[Block]:
    b: list[Block] = [Heading(3, "Drop per dimension, method and bit width (vs the model's fp16)")]
    dims = [m for m in metrics if m != ALL_TASKS]
    rows = []
    for cfg in configs:
        fp = next((c for c in configs if c.model == cfg.model and c.fp), None)
        if cfg.fp or fp is None:
            continue
        row = [cfg.label(True, multi_calib), str(len(cfg.cells))]
        for m in dims:
            q, f = cfg.quality.get(m), fp.quality.get(m)
            row.append(_fmt_diff(compare(f, q, paired=True), m) if q and f else "–")
        rows.append(row)
    if not rows:
        return b + [Paragraph("Needs an fp reference and a quantized configuration of the same model.")]
    b.append(
        Paragraph(
            f"Δ = quantized − fp16: {LM} in bits per byte (positive = worse), dimensions in accuracy points "
            "(negative = worse; mean over the dimension's tasks); paired bootstrap over the same windows/items, "
            "seeds resampled; * = 95% interval excludes 0."
        )
    )
    b.append(Table(["configuration", "seeds"] + [f"Δ {m}" for m in dims], rows))
    return b


# ---------------------------------------------------------------- perplexity as a proxy


def proxy_points(configs: list[Config], dims: dict[str, str]) -> tuple[list[dict], list[str]]:
    """One point per quantized model (cell) with an fp of its model: the bits-per-byte increase
    (mean over sources) and the accuracy drop (fp − quantized, points) of every task and dimension."""
    targets = list(dims) + [d for d in dict.fromkeys(dims.values())]
    pts = []
    for cfg in configs:
        fp = next((c for c in configs if c.model == cfg.model and c.fp), None)
        if cfg.fp or fp is None or LM not in fp.quality:
            continue
        for cell in cfg.cells:
            one = Config(cfg.model, cfg.display, cfg.method, cfg.wbits, cfg.calib, [cell])
            lm = {k: s for k in fp.quality[LM] if (s := stratum([cell], k)) is not None}
            if not lm:
                continue
            fp_lm = {k: fp.quality[LM][k] for k in lm}
            p = {"model": cfg.display, "label": one.label(True, bool(cfg.calib)), "x": estimate(lm) - estimate(fp_lm)}
            drops: dict[str, float] = {}
            for k in dims:
                s, f = stratum([cell], k), stratum(fp.cells, k)
                if s is not None and f is not None:
                    drops[k] = 100 * (estimate({k: f}) - estimate({k: s}))
            for d in dict.fromkeys(dims.values()):  # a dimension: the mean drop of its tasks
                vals = [v for k, v in drops.items() if k in dims and dims[k] == d]
                if vals:
                    drops[d] = sum(vals) / len(vals)
            p["y"] = drops
            pts.append(p)
    return pts, targets


def _proxy_section(configs: list[Config], dims: dict[str, str], fig_dir: Path) -> list[Block]:
    b: list[Block] = [Heading(3, "Perplexity as a proxy: does the bits-per-byte increase predict task drops?")]
    if not dims:
        return b + [Paragraph("No task in this study.")]
    pts, targets = proxy_points(configs, dims)
    if len(pts) < 3:
        return b + [Paragraph(f"Needs 3 or more quantized models with an fp reference; this study has {len(pts)}.")]
    rows, found, res = [], [], {}
    for t in targets:
        xs = [p["x"] for p in pts if t in p["y"]]
        ys = [p["y"][t] for p in pts if t in p["y"]]
        r = spearman_ci(xs, ys)
        res[t] = r
        name = t.split(":", 1)[1].split("@")[0] if t.startswith("task:") else t
        kind = "task" if t.startswith("task:") else "dimension"
        ci = "–" if math.isnan(r.ci[0]) else f"[{r.ci[0]:+.2f}, {r.ci[1]:+.2f}]"
        pv = "–" if math.isnan(r.p) else f"{r.p:.3g}"
        rows.append(
            [name, kind, str(r.n), "–" if math.isnan(r.rho) else f"{r.rho:+.2f}", ci, pv, "yes" if r.finding else "no"]
        )
        if r.finding:
            found.append(f"{name} ({kind}): ρ = {r.rho:+.2f} {ci}, permutation p = {pv}")
    b.append(
        Paragraph(
            "x: increase in bits per byte over the model's own fp16 (mean over held-out sources; tokenizer-"
            "independent, so models of different tokenizers share one axis); y: accuracy drop in points "
            "(fp16 − quantized). Spearman ρ over the quantized models (each calibration seed is one model), "
            '95% percentile bootstrap interval over models, and the permutation p of "no association" '
            "(exact up to 8 models); a finding only where the interval excludes 0 and p < 0.05 (with a "
            "handful of models and tied drops the bootstrap interval alone is too narrow)."
        )
    )
    b.append(Table(["target", "kind", "models", "Spearman ρ", "95% CI", "permutation p", "finding"], rows))
    b.append(
        Paragraph(
            ("Findings: " + "; ".join(found) + ".")
            if found
            else "No finding: for no task or dimension do the interval and the permutation test both exclude "
            "no association (with few quantized models neither can)."
        )
    )
    if _fig_proxy(pts, [t for t in targets if not t.startswith("task:")], res, fig_dir / "proxy.png"):
        b.append(Image("figures/proxy.png", "accuracy drop against bits-per-byte increase per dimension"))
    return b


# ---------------------------------------------------------------- figures


def _fig_frontier(fronts: dict, path: Path, multi_calib: bool) -> bool:
    from .plotting import place_labels as _place
    from .plotting import pyplot as _pyplot
    from .plotting import save_figure as _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(fronts), squeeze=False, figsize=(6 * len(fronts), 4.4))
    labels: list[tuple[Axes, list[tuple[float, float, str]]]] = []
    for ax, (m, (cs, front)) in zip(axes[0], fronts.items()):
        mine_labels: list[tuple[float, float, str]] = []
        scale = 1.0 if m == LM else 100.0
        models = list(dict.fromkeys(c.display for c in cs))
        for k, model in enumerate(models):
            mine = [c for c in cs if c.display == model]
            xs = [c.size.total_bytes / 1e6 for c in mine]
            ys = [scale * estimate(c.quality[m]) for c in mine]
            cis = [interval(c.quality[m]) for c in mine]
            err = [
                [max(0.0, y - scale * lo) for y, (lo, _) in zip(ys, cis)],
                [max(0.0, scale * hi - y) for y, (_, hi) in zip(ys, cis)],
            ]
            ax.errorbar(xs, ys, yerr=err, fmt="o", color=f"C{k}", capsize=2, ms=5, label=model)
            mine_labels += [(x, y, f"{c.label(False, multi_calib)}") for x, y, c in zip(xs, ys, mine)]
        fx = [c.size.total_bytes / 1e6 for c in front]
        fy = [scale * estimate(c.quality[m]) for c in front]
        ax.step(fx, fy, where="post", color="grey", lw=1, ls="--", label="frontier")
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="grey", lw=1)  # ringed: on the frontier
        ax.set_xlabel("packed size, MB", fontsize=8)
        ax.set_ylabel("bits per byte (lower is better)" if m == LM else "accuracy %, mean over tasks", fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=7)
        labels.append((ax, mine_labels))
    # labelled last, once the axes have their final size: a label goes where it overlaps nothing
    missing = [lab for ax, pts in labels for lab in _place(ax, pts)]
    _save(
        fig,
        path,
        "Points: configurations (model, method, bits); whiskers: 95% bootstrap intervals over windows/items "
        "and seeds. Ringed and dashed: the frontier (configurations no smaller configuration beats)."
        + (f" Not labelled (no room): {', '.join(dict.fromkeys(missing))}." if missing else ""),
    )
    return True


def _fig_proxy(pts: list[dict], targets: list[str], res: dict, path: Path) -> bool:
    from .plotting import pyplot as _pyplot
    from .plotting import save_figure as _save

    targets = [t for t in targets if sum(t in p["y"] for p in pts) >= 3]
    if not targets:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(targets), squeeze=False, figsize=(4.2 * len(targets), 3.8))
    models = list(dict.fromkeys(p["model"] for p in pts))
    for ax, t in zip(axes[0], targets):
        for k, model in enumerate(models):
            mine = [p for p in pts if p["model"] == model and t in p["y"]]
            ax.scatter([p["x"] for p in mine], [p["y"][t] for p in mine], color=f"C{k}", s=18, label=model)
        r = res[t]
        ci = "" if math.isnan(r.ci[0]) else f" [{r.ci[0]:+.2f}, {r.ci[1]:+.2f}]"
        ax.set_title(f"{t}: ρ = {r.rho:+.2f}{ci}" if not math.isnan(r.rho) else t, fontsize=8)
        ax.set_xlabel("bits-per-byte increase vs fp16", fontsize=8)
        ax.set_ylabel("accuracy drop, points", fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=6)
    _save(fig, path, "One point per quantized model. ρ: Spearman over models, 95% bootstrap interval over models.")
    return True
