"""Quality side of the CPU precision and GPTQ-default decisions, on smollm2-135m.

Two experiments, one JSON line per run appended to --out (a rerun skips finished runs):

  defaults   GPTQ with the paper's column order vs act-order with static groups, W4 and W3 g64,
             128 x 512 wikipedia calibration tokens, three calibration seeds, precision `auto`;
  precision  GPTQ (the chosen default) and AWQ at W3 g64 in float32 and in bf16 autocast, same
             seeds, 32 x 512 calibration tokens (float32 GPTQ at 128 x 512 takes ~5 minutes a
             run here; benchmarks/cpu_speed.py compares the two at 128 x 512 for one seed), to
             check that bf16 forwards leave quantization quality within the seed spread.

Every quantized model is scored on the held-out text of every offline source (16 windows x 512;
8 in the precision experiment, where float32 scoring costs as much as quantizing).

    python benchmarks/precision_and_defaults.py --out docs/results/precision-and-defaults.jsonl
    python benchmarks/precision_and_defaults.py --summary docs/results/precision-and-defaults.jsonl
    python benchmarks/precision_and_defaults.py --fp     # the unquantized model: float32 vs bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

SOURCES = ["wikipedia", "news", "pydocs", "zh-news"]
SEEDS = [42, 567, 1234]
ORDERS = {"paper": {}, "act-order+static": {"act_order": True, "static_groups": True}}


def runs(default_order: str | None) -> list[dict]:
    out = [
        {"exp": "defaults", "method": "gptq", "order": o, "wbits": b, "seed": s, "dtype": "auto", "nsamples": 128}
        for b in (3, 4)
        for s in SEEDS
        for o in ORDERS
    ]
    if default_order is not None:
        out += [
            {
                "exp": "precision",
                "method": m,
                "order": default_order if m == "gptq" else "-",
                "wbits": 3,
                "seed": s,
                "dtype": d,
                "nsamples": 32,
            }
            for m in ("gptq", "awq")
            for s in SEEDS
            for d in ("float32", "auto")
        ]
    return out


def key(r: dict) -> str:
    return f"{r['method']}|{r['order']}|w{r['wbits']}|{r['seed']}|{r['dtype']}|{r.get('nsamples', 128)}"


def run_one(r: dict, seqlen: int, windows: int) -> dict:
    from quantshift.data.calibset import build_calibset
    from quantshift.evaluation.perplexity import perplexity
    from quantshift.models.load import load_model
    from quantshift.pipeline import quantize_model
    from quantshift.recipes import recipe_from_dict

    lm = load_model("smollm2-135m", "cpu", r["dtype"])
    cal = build_calibset("wikipedia", lm.tokenizer, r["nsamples"], seqlen, r["seed"], tokenizer_name="smollm2-135m")
    opts = {"wbits": r["wbits"], "group_size": 64, **ORDERS.get(r["order"], {})}
    t0 = time.perf_counter()
    quantize_model(lm, recipe_from_dict({"stages": [{r["method"]: opts}]}), cal, device="cpu", progress=False)
    secs = time.perf_counter() - t0
    windows = windows if r["exp"] == "defaults" else windows // 2
    ppl = {
        s: perplexity(
            lm.model, lm.tokenizer, s, seqlen=512, max_windows=windows, progress=False, compute=lm.compute
        ).ppl
        for s in SOURCES
    }
    return {
        **r,
        "precision": lm.precision.name,
        "quant_seconds": round(secs, 1),
        "load1": os.getloadavg()[0],
        "ppl": ppl,
    }


def load(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {key(d): d for d in map(json.loads, path.read_text().splitlines()) if d}


def chosen_order(done: dict[str, dict]) -> str | None:
    """The column order with the lower geometric-mean W3+W4 perplexity over seeds and sources,
    once every defaults run has finished."""
    rows = [d for d in done.values() if d["exp"] == "defaults"]
    if len(rows) < len(runs(None)):
        return None
    score = {
        o: statistics.fmean(math.log(p) for d in rows if d["order"] == o for p in d["ppl"].values()) for o in ORDERS
    }
    return min(score, key=score.get)


def summary(done: dict[str, dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for d in done.values():
        groups.setdefault(
            (d["exp"], d["method"], d["order"], d["wbits"], d["precision"], d.get("nsamples", 128)), []
        ).append(d)
    print(
        f"{'experiment':10s} {'method':5s} {'order':17s} {'bits':4s} {'precision':26s} {'calib':>8s} {'n':>2s} "
        + " ".join(f"{s:>17s}" for s in SOURCES)
        + "  quant s"
    )
    for (exp, m, o, b, p, ns), ds in sorted(groups.items()):
        cells = []
        for s in SOURCES:
            v = [d["ppl"][s] for d in ds]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.fmean(v):8.2f} ±{sd:6.2f}")
        secs = statistics.fmean(d["quant_seconds"] for d in ds)
        print(
            f"{exp:10s} {m:5s} {o:17s} W{b:<3d} {p:26s} {ns:4d}x512 {len(ds):2d} "
            + " ".join(f"{c:>17s}" for c in cells)
            + f"  {secs:7.1f}"
        )
    print(
        "cells: mean ± SD over calibration seeds " + ", ".join(map(str, SEEDS)) + "; held-out ppl, 16 x 512 windows "
        "(news and pydocs have 14; 8 in the precision experiment)"
    )


def fp_table(windows: int) -> None:
    """Held-out perplexity of the unquantized model on every offline source in float32 and in bf16
    autocast, the same windows for both, with the per-window NLL difference's spread."""
    import torch

    from quantshift.data.calibset import token_stream
    from quantshift.data.sources import get_source
    from quantshift.evaluation.perplexity import window_nlls, windows_of
    from quantshift.models.load import load_model
    from quantshift.models.precision import Precision

    lm = load_model("smollm2-135m", "cpu", "float32")
    bf16 = Precision(torch.float32, torch.bfloat16)
    print(
        f"{'source':10s} {'windows':>7s} {'float32':>9s} {'bf16 autocast':>14s} {'relative':>9s} {'sd dNLL/token':>14s}"
    )
    for src in SOURCES:
        win = windows_of(token_stream(get_source(src), "heldout", lm.tokenizer), 512, None, windows)
        scored = win.shape[0] * (win.shape[1] - 1)
        a = window_nlls(lm.model, win, 8, progress=False)
        b = window_nlls(lm.model, win, 8, progress=False, compute=lambda: bf16.context("cpu"))
        pa, pb = math.exp(float(a.sum()) / scored), math.exp(float(b.sum()) / scored)
        print(
            f"{src:10s} {win.shape[0]:7d} {pa:9.3f} {pb:14.3f} {pb / pa - 1:+9.3%} "
            f"{float(((b - a) / (win.shape[1] - 1)).std()):14.4f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/precision-and-defaults.jsonl")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--summary", default=None, help="print the table of a finished --out file and exit")
    ap.add_argument("--fp", action="store_true", help="only the unquantized model's float32 vs bf16 table")
    args = ap.parse_args()
    if args.fp:
        fp_table(args.windows)
        return
    if args.summary:
        summary(load(Path(args.summary)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        done = load(out)
        todo = [r for r in runs(chosen_order(done)) if key(r) not in done]
        if not todo:
            break
        res = run_one(todo[0], args.seqlen, args.windows)
        with out.open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)
    summary(load(out))


if __name__ == "__main__":
    main()
