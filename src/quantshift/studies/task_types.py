"""The report's task-type section, for instruction-tuned evaluation (the instruct-offline suite's
task types: commonsense QA, knowledge and language, instruction following, hallucination
detection, mathematics). It asks four of the questions that evaluation asked, each with
intervals, and states a verdict only where an interval excludes "no effect":

- iso-size per task type: a larger model quantized to the size of a smaller one against that
  smaller one (the iso-memory machinery of frontier.py, per type instead of per dimension);
- methods at equal bit width per task type: each method's drop against the model's fp16, and every
  method against the best one, paired over the same items;
- chat template on vs off for the unquantized models (when the study ran the ablation,
  evaluation.chat_template_ablation): the same items with and without the template, paired;
- does item difficulty predict the drop (evaluation.difficulty): an item's difficulty is the share
  of the *other* models' fp16 references that get it wrong (leaving the model's own reference
  out: with it, items it got right could only lose and items it got wrong only gain, a slope made
  by construction), and the drop is regressed on it per configuration.

A task's type is the category the suite records with its results; the section appears when some
task carries one of INSTRUCT_TYPES.
"""

from __future__ import annotations

from collections import defaultdict

from ..evaluation.difficulty import drop_vs_difficulty, item_difficulty
from ..evaluation.pareto import Candidate, Quality, compare, estimate, iso_memory_pairs
from .document import Block, Heading, Paragraph, Table
from .frontier import Config, _fmt_diff, _fmt_q, _iso_verdict, _mb, stratum, task_categories
from .records import CellResult
from .spec import RAW_SUFFIX, EvalUnit

INSTRUCT_TYPES = (
    "commonsense_qa",
    "knowledge_language",
    "instruction_following",
    "hallucination",
    "mathematics",
    "dialogue",
)
ALL = "all task types"


def unit_types(cells: list[CellResult], units: list[EvalUnit]) -> dict[str, str]:
    """Task unit key -> its type (the category recorded with its results)."""
    return {k: str(cat).strip().lower() for k, cat in task_categories(cells, units).items() if cat}


def type_qualities(cfg: Config, types: dict[str, str]) -> dict[str, Quality]:
    """A configuration's accuracy per task type (its tasks as strata), and over all types."""
    out: dict[str, Quality] = defaultdict(dict)
    for key, t in types.items():
        s = stratum(cfg.cells, key)
        if s is not None:
            out[t][key] = s
            out[ALL][key] = s
    return dict(out)


def task_type_blocks(
    configs: list[Config], cells: list[CellResult], units: list[EvalUnit], multi_calib: bool
) -> list[Block]:
    types = unit_types(cells, units)
    if not any(t in INSTRUCT_TYPES for t in types.values()):
        return []
    order = [t for t in INSTRUCT_TYPES if t in types.values()] + sorted(set(types.values()) - set(INSTRUCT_TYPES))
    names = [*order, ALL]
    qual = {c.key: type_qualities(c, types) for c in configs}
    by_type: dict[str, list[str]] = defaultdict(list)
    for k, t in types.items():
        by_type[t].append(k.split(":", 1)[1].split("@")[0])
    b: list[Block] = [
        Heading(2, "Task types (instruction-tuned evaluation)"),
        Paragraph(
            "Types: "
            + "; ".join(f"{t}: {', '.join(sorted(set(by_type[t])))}" for t in order)
            + ". Accuracy in points, mean over a type's tasks; intervals are 95% bootstrap over items "
            "(paired where two configurations scored the same items) and seeds; * = the interval "
            "excludes 0."
        ),
    ]
    b += _iso_by_type(configs, qual, names, multi_calib)
    b += _methods_by_type(configs, qual, names)
    b += _difficulty_section(configs, types, multi_calib)
    b += _chat_template_section(configs, types, names)
    return b


def _iso_by_type(configs: list[Config], qual: dict, names: list[str], multi_calib: bool) -> list[Block]:
    b: list[Block] = [Heading(3, "Equal size: a larger model quantized, or a smaller one, per task type")]
    params = {c.model: c.size.quantized_params + c.size.dense_params for c in configs if c.size is not None}
    if len(params) < 2:
        return b + [Paragraph("Needs two or more models with known sizes.")]
    by_key = {c.key: c for c in configs}
    rows, verdicts = [], defaultdict(list)
    for t in names:
        sized = [c for c in configs if c.size is not None and qual[c.key].get(t)]
        cands = [Candidate(c.model, c.key, c.size.total_bytes, estimate(qual[c.key][t])) for c in sized]  # type: ignore[union-attr]
        for r in iso_memory_pairs(cands, params, True):
            big, small = by_key[r["larger"].key], by_key[r["smaller"].key]
            cmp = compare(qual[small.key][t], qual[big.key][t], paired=True)
            verdict = _iso_verdict(cmp, t)
            verdicts[t].append(verdict)
            rows.append(
                [
                    t,
                    f"{r['budget'] / 1e6:.3g}",
                    f"{big.label(True, multi_calib)} ({_mb(big.size)} MB)",
                    _fmt_q(r["larger"].quality, t),
                    f"{small.label(True, multi_calib)} ({_mb(small.size)} MB)",
                    _fmt_q(r["smaller"].quality, t),
                    _fmt_diff(cmp, t),
                    verdict,
                ]
            )
    if not rows:
        return b + [Paragraph("No budget fits a configuration of two models.")]
    b.append(
        Table(
            [
                "task type",
                "budget MB",
                "larger model",
                "acc %",
                "smaller model",
                "acc %",
                "Δ larger − smaller [95% CI]",
                "verdict",
            ],
            rows,
        )
    )
    summary = []
    for t, vs in verdicts.items():
        counts = {v: vs.count(v) for v in dict.fromkeys(vs)}
        summary.append(f"{t}: " + ", ".join(f"{v} at {n} budget{'s' * (n != 1)}" for v, n in counts.items()))
    b.append(Paragraph("Per task type: " + "; ".join(summary) + "."))
    return b


def _methods_by_type(configs: list[Config], qual: dict, names: list[str]) -> list[Block]:
    b: list[Block] = [Heading(3, "Methods at equal bit width, per task type")]
    groups: dict[tuple[str, int], list[Config]] = defaultdict(list)
    for c in configs:
        if not c.fp:
            groups[(c.model, c.wbits)].append(c)
    rows = []
    for (model, bits), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        fp = next((c for c in configs if c.model == model and c.fp), None)
        methods = {c.method: c for c in cs}
        if len(methods) < 2:
            continue
        for t in names:
            have = {m: c for m, c in methods.items() if qual[c.key].get(t)}
            if len(have) < 2:
                continue
            best_m = max(have, key=lambda m: estimate(qual[have[m].key][t]))
            best = qual[have[best_m].key][t]
            drops = []
            for m, c in sorted(have.items(), key=lambda mc: -estimate(qual[mc[1].key][t])):
                d = compare(qual[fp.key][t], qual[c.key][t], paired=True) if fp and qual[fp.key].get(t) else None
                vs_best = (
                    "" if m == best_m else f"; vs {best_m} {_fmt_diff(compare(best, qual[c.key][t], paired=True), t)}"
                )
                drops.append(f"{m} {_fmt_diff(d, t)}{vs_best}")
            rows.append([cs[0].display, f"W{bits}", t, best_m, " · ".join(drops)])
    if not rows:
        return b + [Paragraph("Needs two or more methods at one bit width of one model.")]
    b.append(
        Paragraph(
            "Each method's Δ = quantized − fp16 of the same model (accuracy points, paired over items), ranked "
            "best first; every other method against the best one (paired; * = different)."
        )
    )
    b.append(Table(["model", "bits", "task type", "best", "Δ vs fp16 [95% CI], ranked"], rows))
    return b


def _item_correctness(cells: list[CellResult], keys: list[str]) -> dict[str, float]:
    """Item -> mean correctness over a configuration's seeds ("task/id" across its tasks)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        for k in keys:
            for s in c["samples"].get(k) or []:
                if s.get("acc") is not None:
                    sums[f"{k}/{s['id']}"].append(float(s["acc"]))
    return {i: sum(v) / len(v) for i, v in sums.items()}


def _difficulty_section(configs: list[Config], types: dict[str, str], multi_calib: bool) -> list[Block]:
    b: list[Block] = [Heading(3, "Does task difficulty predict the drop?")]
    fps = [c for c in configs if c.fp]
    if not fps or not any(not c.fp for c in configs):
        return b + [Paragraph("Needs fp16 references and quantized configurations.")]
    keys_of: dict[str, list[str]] = defaultdict(list)
    for k, t in types.items():
        keys_of[t].append(k)
        keys_of[ALL].append(k)
    rows, found = [], []
    for cfg in configs:
        fp = next((c for c in fps if c.model == cfg.model), None)
        if cfg.fp or fp is None:
            continue
        others = [c for c in fps if c.model != cfg.model] or [fp]
        for t in [
            *[x for x in INSTRUCT_TYPES if x in keys_of],
            *sorted(set(keys_of) - set(INSTRUCT_TYPES) - {ALL}),
            ALL,
        ]:
            keys = keys_of[t]
            diff = item_difficulty([_item_correctness(c.cells, keys) for c in others])
            ref, q = _item_correctness(fp.cells, keys), _item_correctness(cfg.cells, keys)
            try:
                fit = drop_vs_difficulty(diff, ref, q)
            except ValueError:
                continue
            ci = "–" if fit.ci[0] != fit.ci[0] else f"[{fit.ci[0]:+.3f}, {fit.ci[1]:+.3f}]"
            rows.append(
                [
                    cfg.label(True, multi_calib),
                    t,
                    str(fit.n),
                    "–" if fit.slope != fit.slope else f"{fit.slope:+.3f}",
                    ci,
                    fit.verdict().split(":")[0] if fit.significant else "no significant relation",
                ]
            )
            if fit.significant:
                found.append(f"{cfg.label(True, multi_calib)} on {t}: {fit.verdict()}")
    if not rows:
        return b + [Paragraph("Too few shared items to fit.")]
    source = (
        "the other models' fp16 references"
        if len({c.model for c in fps}) > 1
        else "the model's own fp16 reference (only one model: the slope is biased toward 'easier items lose more')"
    )
    b.append(
        Paragraph(
            f"Item difficulty = share of {source} that answer the item wrong; drop = fp16 correctness − "
            "quantized correctness (mean over seeds); least-squares slope of drop on difficulty with a 95% "
            "bootstrap interval over items."
        )
    )
    b.append(Table(["configuration", "task type", "items", "slope", "95% CI", "verdict"], rows))
    b.append(
        Paragraph(
            ("Significant: " + "; ".join(found) + ".")
            if found
            else "No configuration shows a significant relation between item difficulty and its drop."
        )
    )
    return b


def _chat_template_section(configs: list[Config], types: dict[str, str], names: list[str]) -> list[Block]:
    """Each unquantized model with and without its chat template, per task type (paired over items)."""
    fps = [c for c in configs if c.fp and any(k + RAW_SUFFIX in c.cells[0]["samples"] for k in types)]
    if not fps:
        return []
    b: list[Block] = [Heading(3, "Chat template on vs off (unquantized models)")]
    rows, notes = [], []
    for fp in fps:
        applied = {bool((fp.cells[0]["metrics"].get(k) or {}).get("chat_template")) for k in types}
        if applied == {False}:
            notes.append(f"{fp.display} has no chat template: both runs fed raw prompts, nothing to compare")
            continue
        for t in names:
            keys = [k for k, kt in types.items() if t in (kt, ALL)]
            on = {k: s for k in keys if (s := stratum(fp.cells, k)) is not None}
            off = {k: s for k in keys if (s := stratum(fp.cells, k + RAW_SUFFIX)) is not None}
            cmp = compare(off, on, paired=True)
            if cmp is None:
                continue
            rows.append([fp.display, t, _fmt_q(estimate(on), t), _fmt_q(estimate(off), t), _fmt_diff(cmp, t)])
    if rows:
        b.append(
            Paragraph(
                "The same items, prompts through the tokenizer's chat template (lm-eval's apply_chat_template) "
                "and raw; Δ = on − off in accuracy points, 95% paired bootstrap over items (* = excludes 0)."
            )
        )
        b.append(Table(["model", "task type", "acc % on", "acc % off", "Δ on − off [95% CI]"], rows))
    if notes:
        b.append(Paragraph("; ".join(notes) + "."))
    return b
