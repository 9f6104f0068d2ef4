"""Bits per byte, packed size, the quality-size frontier, iso-memory answers, dimension drops and
perplexity as a proxy: known answers on toy models and synthetic results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, _tiny, toy_tokenizer

from quantshift.evaluation.pareto import (
    Candidate,
    PackedSize,
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
from quantshift.evaluation.perplexity import (
    bits_per_unit,
    heldout_windows,
    perplexity,
    token_ends,
    window_nlls,
)


class Uniform(torch.nn.Module):
    """Every next token equally likely: NLL per token = ln(vocab) exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


# chr(150) is in the toy tokenizer's vocabulary (one token) and takes 2 bytes in UTF-8
TEXT = "".join(("ab" + chr(150) + "c ")[i % 5] for i in range(400))


@pytest.mark.parametrize("bos", [None, 1])
def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_times_tokens_over_bytes(bos):
    tok = toy_tokenizer()
    seqlen = 9
    hw = heldout_windows(TEXT, tok, seqlen, bos, None)
    assert hw.method == "offsets"
    body = seqlen - 1 if bos is not None else seqlen
    n = hw.ids.shape[0]
    assert n == len(TEXT) // body
    # the characters a window scores: every body character with BOS, all but the first without
    first = 0 if bos is not None else 1
    want = [TEXT[w * body + first : (w + 1) * body] for w in range(n)]
    assert hw.bytes == [len(t.encode("utf-8")) for t in want] and hw.chars == [len(t) for t in want]
    assert sum(hw.bytes) > sum(hw.chars)  # the 2-byte characters are counted as 2
    nll = window_nlls(Uniform(VOCAB), hw.ids, progress=False)
    scored = n * (seqlen - 1)
    assert float(nll.sum()) == pytest.approx(scored * math.log(VOCAB))
    bpb = bits_per_unit(float(nll.sum()), sum(hw.bytes))
    assert bpb == pytest.approx(math.log2(VOCAB) * scored / sum(hw.bytes), rel=1e-7)  # float32 log-softmax


def test_owned_spans_tile_the_text():
    """Each token owns the text from the end of the previous token to its own end: the spans
    add up to the whole text, whitespace the tokenizer folds away included."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "héllo": 3, "wörld": 4, "a": 5}
    t = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the spaces: no token covers them
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    text = "héllo  wörld a héllo"
    ids, char_ends, byte_ends = token_ends(text, tok)
    assert ids == [3, 4, 5, 3]
    assert list(char_ends) == [5, 12, 14, 20] and byte_ends[-1] == len(text.encode("utf-8"))
    assert list(np.diff(np.concatenate([[0], byte_ends]))) == [6, 8, 2, 7]


def test_perplexity_reports_bits_per_byte(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("\n\n".join(f"{i} {TEXT}" for i in range(10)))  # every fifth paragraph is held out
    r = perplexity(Uniform(VOCAB), toy_tokenizer(), str(src), seqlen=9, progress=False)
    assert r.text_units_method == "offsets" and r.bytes > r.chars
    assert r.bpb == pytest.approx(math.log2(VOCAB) * r.tokens / r.bytes)
    assert r.bpc == pytest.approx(math.log2(VOCAB) * r.tokens / r.chars)


# ---------------------------------------------------------------- packed size and frontier


def test_packed_size_counts_codes_scales_zeros_and_dense_params():
    shapes = {"l.weight": (4, 256), "emb.weight": (10, 8), "norm.weight": (8,)}
    asym = packed_size_bytes(shapes, {"l": WeightFormat(4, 128, False)})
    # codes 4 x 256 x 4 bits; 4 rows x 2 groups x (16-bit scale + 4-bit zero); 88 dense params x 16 bits
    assert asym.total_bytes == (4 * 256 * 4 + 8 * 20 + 88 * 16) // 8
    assert (asym.quantized_params, asym.dense_params) == (1024, 88)
    sym = packed_size_bytes(shapes, {"l": WeightFormat(4, 128, True)})
    assert asym.total_bytes - sym.total_bytes == 8 * 4 // 8
    fp = packed_size_bytes(shapes, {})
    assert fp.total_bytes == 2 * (1024 + 88) and fp.bits_per_param == 16
    per_channel = packed_size_bytes(shapes, {"l": WeightFormat(3, -1, True)})
    assert per_channel.total_bytes == (4 * 256 * 3 + 4 * 16 + 88 * 16) // 8
    with pytest.raises(ValueError, match="without a weight"):
        packed_size_bytes(shapes, {"nope": WeightFormat(4, 128)})


def test_pareto_front_known_answer():
    sizes = [5, 1, 2, 3, 4, 3]
    acc = [0.9, 0.5, 0.4, 0.7, 0.7, float("nan")]
    assert pareto_front(sizes, acc) == [1, 3, 0]  # 2 is beaten by a smaller one, 4 ties 3 at a larger size
    bpb = [1.0, 2.0, 2.5, 1.5, 1.5, 1.6]
    assert pareto_front(sizes, bpb, higher_better=False) == [1, 3, 0]  # 5 loses to 3 at the same size


def test_iso_memory_budgets_pick_the_best_that_fits():
    big = [Candidate("big", f"big-w{b}", s, q) for b, s, q in ((4, 390, 0.60), (3, 375, 0.55), (2, 363, 0.30))]
    small = [Candidate("small", f"small-w{b}", s, q) for b, s, q in ((16, 269, 0.50), (8, 166, 0.49), (4, 113, 0.45))]
    rows = iso_memory_pairs(big + small, {"big": 270, "small": 135})
    assert [(r["budget"], r["larger"].key, r["smaller"].key) for r in rows] == [
        (363, "big-w2", "small-w16"),
        (375, "big-w3", "small-w16"),
        (390, "big-w4", "small-w16"),
    ]
    # lower is better (bits per byte): the pick is the lowest value within the budget
    rows = iso_memory_pairs(
        [
            Candidate("big", "b2", 10, 1.0),
            Candidate("big", "b4", 20, 0.8),
            Candidate("small", "s8", 5, 0.9),
            Candidate("small", "s16", 9, 1.1),
        ],
        {"big": 2, "small": 1},
        higher_better=False,
    )
    assert [(r["budget"], r["larger"].key, r["smaller"].key) for r in rows] == [(10, "b2", "s8"), (20, "b4", "s8")]


def _acc(p: float, n: int, seed: int, seeds: int = 1) -> Stratum:
    rng = np.random.default_rng(seed)
    num = (rng.random((seeds, n)) < p).astype(float)
    return Stratum(num, np.ones_like(num), tuple(f"i{k}" for k in range(n)))


def test_compare_finds_a_real_gap_and_not_an_absent_one():
    a, b = {"t": _acc(0.5, 400, 1)}, {"t": _acc(0.75, 400, 2, seeds=3)}
    c = compare(a, b, paired=True)
    assert c.diff == pytest.approx(estimate(b) - estimate(a)) and c.significant and c.ci[0] > 0.1 and c.p < 0.01
    same = compare(a, a, paired=True)
    assert same.diff == 0 and not same.significant
    noise = compare({"t": _acc(0.6, 200, 3)}, {"t": _acc(0.6, 200, 4)}, paired=True)
    assert noise.ci[0] < 0 < noise.ci[1] and not noise.significant
    lo, hi = interval(b)
    assert lo < estimate(b) < hi
    # bits per byte: a ratio of sums over windows (NLL bits / bytes)
    s = Stratum(np.array([[10.0, 30.0]]), np.array([[10.0, 10.0]]), ("w0", "w1"))
    assert estimate({"src": s}) == pytest.approx(2.0)


def test_spearman_interval_monotone_vs_noise():
    x = np.arange(12, dtype=float)
    r = spearman_ci(x, x**3)
    assert r.rho == pytest.approx(1.0) and r.ci == (pytest.approx(1.0), pytest.approx(1.0)) and r.excludes_zero
    assert r.p < 0.001 and r.finding
    assert spearman_ci(x, -x).ci[1] == pytest.approx(-1.0)
    rng = np.random.default_rng(7)
    noise = spearman_ci(rng.normal(size=12), rng.normal(size=12))
    assert noise.ci[0] < 0 < noise.ci[1] and not noise.excludes_zero and not noise.finding
    # 5 models whose drops form a step: the bootstrap interval excludes 0, but 2 of the 10 distinct
    # orderings correlate as strongly (exact permutation p = 0.2): no finding
    step = spearman_ci([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])
    assert step.excludes_zero and step.p == pytest.approx(0.2) and not step.finding
    assert spearman_ci([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]).p == pytest.approx(2 / 120)
    assert math.isnan(spearman_ci([1.0, 2.0], [2.0, 1.0]).rho)


# ---------------------------------------------------------------- the report section on synthetic results


def _synthetic_collected(tmp_path):
    from quantshift.studies.spec import EvalUnit, study_from_dict

    spec = study_from_dict(
        {
            "name": "iso",
            "models": ["big", "small"],
            "methods": [{"method": "rtn", "wbits": [4]}],
            "evaluation": {"ppl": ["wikipedia"], "tasks": ["k", "bias"]},
        }
    )
    units = [EvalUnit("ppl", "wikipedia"), EvalUnit("task", "k", 0), EvalUnit("task", "bias", 0)]
    cats = {"task:k@0": "knowledge", "task:bias@0": "bias"}

    def cell(model, wbits, bpb, acc_k, acc_b, seed=0):
        rng = np.random.default_rng(seed + wbits + 100 * len(model))
        samples = {
            "ppl:wikipedia": [
                {
                    "id": f"w{i}",
                    "nll": bpb * math.log(2) * 400 / 100 + 0.001 * rng.normal(),
                    "tokens": 100,
                    "bytes": 400,
                }
                for i in range(20)
            ]
        }
        metrics = {"ppl:wikipedia": {"ppl": 1.0, "bpb": bpb}}
        for key, p in (("task:k@0", acc_k), ("task:bias@0", acc_b)):
            scores = (rng.random(300) < p).astype(float)
            samples[key] = [{"id": f"q{i}", "acc": float(s)} for i, s in enumerate(scores)]
            metrics[key] = {"acc": float(scores.mean()), "category": cats[key]}
        fp = wbits == 16
        return {
            "model": {"name": model},
            "method": "fp" if fp else "rtn",
            "wbits": wbits,
            "recipe": None if fp else {},
            "calib": None,
            "label": f"{model}/{wbits}",
            "key": f"{model}{wbits}",
            "status": "done",
            "metrics": metrics,
            "samples": samples,
            "error": None,
            "calib_manifest": None,
            "quant_seconds": 1.0,
            "eval_seconds": 1.0,
            "weight_formats": {},
        }

    cells = [
        cell("big", 16, 0.90, 0.80, 0.70),
        cell("big", 4, 0.95, 0.78, 0.70),
        cell("big", 2, 1.60, 0.40, 0.50),
        cell("small", 16, 1.10, 0.60, 0.60),
        cell("small", 8, 1.10, 0.60, 0.60, seed=8),
        cell("small", 4, 1.20, 0.50, 0.58),
    ]
    sizes = {("big", 16): 540, ("big", 4): 150, ("big", 2): 80, ("small", 16): 270, ("small", 8): 140, ("small", 4): 75}
    return {"spec": spec, "units": units, "cells": cells, "diagnostics": {}, "versions": {}}, sizes


def test_report_section_on_synthetic_results_answers_iso_memory(tmp_path, monkeypatch):
    from quantshift.studies import frontier
    from quantshift.studies.document import to_markdown

    collected, sizes = _synthetic_collected(tmp_path)
    params = {"big": 270, "small": 135}
    monkeypatch.setattr(
        frontier,
        "cell_size",
        lambda c: (PackedSize(sizes[(c["model"]["name"], c["wbits"])] * 10**6, params[c["model"]["name"]], 0), ""),
    )
    md = to_markdown(frontier.frontier_blocks(collected, tmp_path))
    # frontier by bits per byte: big W2 (80 MB, 1.60) is beaten by the smaller small W4 (75 MB, 1.20)
    assert (
        "language modelling (bits per byte, lower is better): the frontier (no other configuration is as small "
        "and better) is small · rtn W4 (75 MB, 1.200), small · rtn W8 (140 MB, 1.100), big · rtn W4 (150 MB, 0.950), "
        "big · fp16 (540 MB, 0.900)." in md
    )
    iso = {
        (r[0], r[1]): r
        for r in (
            line.split(" | ")
            for line in md.splitlines()
            if line.startswith("| language") or line.startswith("| knowledge")
        )
    }
    # 80 MB: big W2 against small W4 -> the smaller model at higher precision wins (bpb 1.60 vs 1.20)
    assert iso[("| language modelling", "80")][-1] == "smaller model better |"
    # 150 MB: big W4 against small W8 -> the larger model at low bits wins on both
    assert iso[("| language modelling", "150")][-1] == "larger model better |"
    assert iso[("| knowledge/capability", "150")][-1] == "larger model better |"
    drops = {
        line.split(" | ")[0]: line
        for line in md.splitlines()
        if line.startswith("| big · rtn") or line.startswith("| small · rtn")
    }
    assert drops["| big · rtn W2"].count("*") == 3  # every dimension drops significantly at W2
    assert "*" not in drops["| small · rtn W8"]  # W8 (here: the same scores as fp16) changes nothing
    assert (tmp_path / "frontier.png").is_file() and (tmp_path / "proxy.png").is_file()


# ---------------------------------------------------------------- a tiny study across two tokenizers


def _bpe_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_tiny_study_across_tokenizers_compares_models_only_by_bits_per_byte(tmp_path):
    from test_studies import TEXTS

    from quantshift.studies.runner import run_study
    from quantshift.studies.spec import study_from_dict

    sources = []
    for name, unit in TEXTS.items():
        p = tmp_path / f"{name}.txt"
        p.write_text("\n\n".join(f"{i} " + unit * 3 for i in range(25)))
        sources.append(str(p))
    dirs = []
    for kind, tok in (("llama", toy_tokenizer()), ("qwen2", _bpe_tokenizer([Path(s).read_text() for s in sources]))):
        d = tmp_path / f"tiny-{kind}"
        _tiny(kind).save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(str(d))
    spec = {
        "name": "two-tokenizers",
        "models": dirs,
        "device": "cpu",
        "diagnostics": {"enabled": False},
        "methods": [{"method": "rtn", "wbits": [4, 2], "group_size": 32}],
        "evaluation": {"ppl": sources[:2], "ppl_seqlen": 32, "ppl_windows": 3},
    }
    summary = run_study(
        study_from_dict(spec), tmp_path / "out", tmp_path / "cache", progress=False, echo=lambda *_: None
    )
    assert summary["failed"] == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    tokens = {}
    for c in res["cells"]:
        m = c["metrics"][f"ppl:{sources[0]}"]
        assert m["bpb"] > 0 and m["bytes"] > 0 and m["text_units"] == "offsets"
        assert m["bpb"] == pytest.approx(m["nll"] * m["tokens"] / (math.log(2) * m["bytes"]))
        tokens[Path(c["model"]["name"]).name] = m["tokens"] / m["bytes"]
    assert tokens["tiny-llama"] != pytest.approx(tokens["tiny-qwen2"])  # the tokenizers really differ
    sizes = {(Path(c["model"]["name"]).name, c["wbits"]): c["packed_bytes"] for c in res["cells"]}
    assert sizes[("tiny-llama", 2)] < sizes[("tiny-llama", 4)] < sizes[("tiny-llama", 16)]
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## Size, quality and evaluation dimensions (across models)")[1].split("\n## ")[0]
    lines = section.splitlines()
    header = next(line for line in lines if line.startswith("| model | configuration | packed MB"))
    assert "bpb prose" in header and "ppl" not in header.lower()
    assert not any("ppl" in line.lower() for line in lines if line.startswith("| quality | budget"))
    assert "never compared across models" in section and "larger − smaller" in section
    # packed size: the fp reference stores every parameter at 16 bits; W2 is smaller than W4
    row = {tuple(r.split(" | ")[:2]): r.split(" | ") for r in lines if r.startswith("| tiny-")}
    for kind in ("llama", "qwen2"):
        n_params = sum(p.numel() for p in _tiny(kind).parameters())
        assert float(row[(f"| tiny-{kind}", "fp16")][2]) == pytest.approx(2 * n_params / 1e6, rel=1e-2)
        assert float(row[(f"| tiny-{kind}", "rtn W2")][2]) < float(row[(f"| tiny-{kind}", "rtn W4")][2])
    assert (tmp_path / "out" / "figures" / "frontier.png").is_file()
    # nowhere in the report does a table with token perplexity hold both models
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    ppl_tables = [t for t in tables if "ppl" in t[0].lower()]
    assert ppl_tables and all(
        sum(any(f"tiny-{k}" in row for row in t) for k in ("llama", "qwen2")) == 1 for t in ppl_tables
    ), ppl_tables
    # the sensitivity tables (fp token perplexity and its relative increase): one per model
    sens = [t for t in tables if t[0].startswith("| test | category | fp")]
    assert len(sens) == 2 and all(len(t) == 2 + 2 for t in sens), sens


def test_iso_memory_preset_quantizes_each_model_to_its_own_bit_widths():
    from quantshift.errors import ConfigError
    from quantshift.studies.spec import expand, load_study, study_from_dict

    spec = load_study(Path(__file__).parent.parent / "studies" / "iso-memory.yaml")
    grid = sorted((c.model.name, c.wbits) for c in expand(spec))
    assert grid == [
        ("gemma3-270m", 2),
        ("gemma3-270m", 3),
        ("gemma3-270m", 4),
        ("gemma3-270m", 16),
        ("smollm2-135m", 4),
        ("smollm2-135m", 8),
        ("smollm2-135m", 16),
    ]
    bad = spec.model_dump()
    bad["methods"][0]["models"] = ["gemma-3"]
    with pytest.raises(ConfigError, match=r"methods\[0\].models: 'gemma-3' is not one of the study's models"):
        expand(study_from_dict(bad))


@pytest.mark.parametrize(
    "method,opts",
    [
        ("rtn", dict(wbits=4, group_size=32)),
        ("rtn", dict(wbits=3, group_size=-1, sym=True)),
        ("fp8", {}),
        ("spqr", dict(wbits=3, group_size=16)),
    ],
)
def test_report_size_from_shapes_equals_the_recorded_packed_bytes(method, opts):
    """The report's size (shapes + recorded formats) and the study's recorded `packed_bytes`
    (counted on the quantized model itself) are one number, SpQR's measured outliers included."""
    from conftest import loaded_tiny, random_calib

    from quantshift.pipeline import quantize_model
    from quantshift.quant.storage import packed_bytes, specs_from_modules
    from quantshift.recipes import recipe_from_cli
    from quantshift.studies.work import weight_formats

    lm = loaded_tiny("llama")
    res = quantize_model(lm, recipe_from_cli(method, **opts), random_calib(), progress=False)
    formats = weight_formats(res.engine.modules)
    recorded = packed_bytes(
        lm.model,
        specs_from_modules(res.engine.modules),
        measured_bits={n: f["measured_bits"] for n, f in formats.items()},
    )
    shapes = {n: tuple(p.shape) for n, p in lm.model.named_parameters()}
    from_shapes = packed_size_bytes(
        shapes,
        {
            m: WeightFormat(f["bits"], f["group_size"], f["sym"], f["measured_bits"], f["dtype"])
            for m, f in formats.items()
        },
    )
    assert from_shapes.total_bytes == recorded
    fp = packed_size_bytes(shapes, {}).total_bytes
    assert recorded < fp * (0.5 if method != "fp8" else 0.75)
    if method == "spqr":  # SpQR's own count (3-bit second-level statistics, outliers) replaces the generic one
        bare = packed_bytes(lm.model, specs_from_modules(res.engine.modules))
        measured = sum(f["measured_bits"] for f in formats.values())
        quantized = sum(p.numel() for n, p in lm.model.named_parameters() if n[: -len(".weight")] in formats)
        assert recorded != bare and 3 < measured / quantized < 5


def test_figure_labels_never_overlap_each_other_markers_or_the_legend():
    """A crowded cluster: every label placed lies inside the axes and overlaps no other label, no
    other point's marker and not the legend; the ones with no room are returned, not drawn."""
    import random

    from quantshift.studies.plotting import place_labels, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.4))
    rng = random.Random(0)
    pts = [(rng.uniform(0, 10), rng.uniform(0, 1), f"gptq W{rng.choice([2, 3, 4])} s{i}") for i in range(150)]
    pts += [(5.0, 0.5, "same place a"), (5.0, 0.5, "same place b")]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], label="models")
    ax.legend(fontsize=7)
    missing = place_labels(ax, pts)
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts]
    assert len(texts) + len(missing) == len(pts) and len(texts) >= 20 and missing
    boxes = [t.get_window_extent(renderer) for t in texts]
    frame = ax.get_window_extent(renderer)
    legend = ax.get_legend().get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert not a.overlaps(legend)
        assert not any(a.overlaps(b) for b in boxes[i + 1 :]), f"{texts[i].get_text()} overlaps another label"
    plt.close(fig)


# ---------------------------------------------------------------- the task-type section (instruction-tuned evaluation)


def test_task_type_section_answers_iso_size_methods_and_difficulty(tmp_path, monkeypatch):
    """Planted: at equal size the larger model wins commonsense QA and loses hallucination
    detection; AWQ beats GPTQ on mathematics at W4; GPTQ's drops fall on the hard items (hard
    by the other model's fp16), AWQ's few drops do not."""
    from quantshift.studies import frontier
    from quantshift.studies.document import to_markdown
    from quantshift.studies.spec import EvalUnit
    from quantshift.studies.task_types import task_type_blocks

    types = {"task:cqa@0": "commonsense_qa", "task:hal@0": "hallucination", "task:math@0": "mathematics"}
    units = [EvalUnit("task", k.split(":")[1].split("@")[0], 0) for k in types]
    right = {  # (model, method, bits) -> task -> the items it answers correctly
        ("small", "fp", 16): {"cqa": lambda i: i < 150, "hal": lambda i: i < 240, "math": lambda i: i < 150},
        ("small", "gptq", 4): {"cqa": lambda i: i < 140, "hal": lambda i: i < 230, "math": lambda i: i < 140},
        ("big", "fp", 16): {"cqa": lambda i: i < 250, "hal": lambda i: i < 160, "math": lambda i: i < 240},
        ("big", "gptq", 4): {"cqa": lambda i: i < 240, "hal": lambda i: i < 150, "math": lambda i: i < 150},
        ("big", "awq", 4): {
            "cqa": lambda i: i < 250,
            "hal": lambda i: i < 160,
            "math": lambda i: i < 240 and i not in (0, 50, 100, 150, 200),
        },
    }

    def cell(model, method, bits):
        samples, metrics = {}, {}
        for key, t in types.items():
            name = key.split(":")[1].split("@")[0]
            samples[key] = [{"id": f"q{i}", "acc": float(right[(model, method, bits)][name](i))} for i in range(300)]
            metrics[key] = {"acc": sum(s["acc"] for s in samples[key]) / 300, "category": t}
        fp = method == "fp"
        return {
            "model": {"name": model},
            "method": method,
            "wbits": bits,
            "recipe": None if fp else {},
            "calib": None,
            "status": "done",
            "metrics": metrics,
            "samples": samples,
            "weight_formats": {},
        }

    cells = [cell(*k) for k in right]
    sizes = {("small", 16): 270, ("small", 4): 75, ("big", 16): 540, ("big", 4): 150}
    params = {"big": 270, "small": 135}
    monkeypatch.setattr(
        frontier,
        "cell_size",
        lambda c: (PackedSize(sizes[(c["model"]["name"], c["wbits"])] * 10**6, params[c["model"]["name"]], 0), ""),
    )
    configs, _ = frontier.configs_of(cells, units)
    md = to_markdown(task_type_blocks(configs, cells, units, False))
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| ")]
    iso = {(r[0][2:], r[1]): r[-1].rstrip(" |") for r in rows if len(r) == 8}
    assert iso[("commonsense_qa", "270")] == "larger model better"
    assert iso[("hallucination", "270")] == "smaller model better"
    methods = {r[2]: r for r in rows if len(r) == 5 and r[1] == "W4"}
    assert methods["mathematics"][3] == "awq" and "vs awq" in methods["mathematics"][4]
    assert methods["mathematics"][4].split("vs awq")[1].split("]")[1].startswith(" *")  # GPTQ significantly worse
    diff = {(r[0][2:], r[1]): r[-1].rstrip(" |") for r in rows if len(r) == 6}
    assert diff[("big · gptq W4", "all task types")] == "harder items lose more"
    assert diff[("big · awq W4", "all task types")] == "no significant relation"
    assert "other models' fp16 references" in md
    # a study without instruct task types gets no such section
    plain = [dict(c, metrics={k: dict(v, category="knowledge") for k, v in c["metrics"].items()}) for c in cells]
    assert task_type_blocks(configs, plain, units, False) == []


def test_chat_template_section_pairs_each_fp_model_with_its_raw_run(monkeypatch):
    """Planted: the template helps the small model on commonsense QA (+20 points on the same items)
    and changes nothing on hallucination; the big model has no template, which the section says
    instead of comparing a run with itself."""
    from quantshift.studies import frontier
    from quantshift.studies.document import to_markdown
    from quantshift.studies.spec import RAW_SUFFIX, EvalUnit
    from quantshift.studies.task_types import _chat_template_section, unit_types

    units = [EvalUnit("task", "cqa", 0), EvalUnit("task", "hal", 0)]
    cat = {"cqa": "commonsense_qa", "hal": "hallucination"}

    def fp_cell(model, templated, right_on, right_off):
        samples, metrics = {}, {}
        for u in units:
            for key, right in ((u.key, right_on[u.name]), (u.key + RAW_SUFFIX, right_off[u.name])):
                samples[key] = [{"id": f"q{i}", "acc": float(right(i))} for i in range(200)]
                metrics[key] = {"acc": 0.5, "category": cat[u.name], "chat_template": templated and key == u.key}
        return {
            "model": {"name": model},
            "method": "fp",
            "wbits": 16,
            "recipe": None,
            "calib": None,
            "status": "done",
            "metrics": metrics,
            "samples": samples,
            "weight_formats": {},
        }

    small = fp_cell(
        "small",
        True,
        {"cqa": lambda i: i < 120, "hal": lambda i: i % 2 == 0},
        {"cqa": lambda i: i < 80, "hal": lambda i: i % 2 == 0},
    )
    big = fp_cell(
        "big",
        False,
        {"cqa": lambda i: i < 150, "hal": lambda i: i < 90},
        {"cqa": lambda i: i < 150, "hal": lambda i: i < 90},
    )
    monkeypatch.setattr(frontier, "cell_size", lambda c: (PackedSize(10**8, 1, 0), ""))
    cells = [small, big]
    configs, _ = frontier.configs_of(cells, units)
    types = unit_types(cells, units)
    md = to_markdown(_chat_template_section(configs, types, ["commonsense_qa", "hallucination", "all task types"]))
    rows = {r.split(" | ")[1]: r.split(" | ") for r in md.splitlines() if r.startswith("| small")}
    assert rows["commonsense_qa"][2:4] == ["60.0", "40.0"] and rows["commonsense_qa"][4].startswith("+20.0 [")
    assert rows["commonsense_qa"][4].rstrip(" |").endswith("*")
    assert rows["hallucination"][4].rstrip(" |") == "+0.0 [+0.0, +0.0]"
    assert "| big" not in md and "big has no chat template" in md
