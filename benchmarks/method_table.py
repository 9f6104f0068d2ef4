"""Every registered quantization method on one model: held-out perplexity per format.

For each cell the fp model is reloaded (cheap after the first conversion), quantized with one
recipe, and scored on held-out text with the GPTQ perplexity protocol (non-overlapping windows).
Cells are written to JSON as they finish (atomic writes), so an interrupted run resumes.

Cells (those whose methods are registered when the script runs):
- weight-only W4/W3/W2 at --group-size (default 64): rtn, gptq, awq, quip; spqr at its own
  format (groups of 16 with 3-bit statistics + 1% fp16 outliers), its measured bits/weight shown;
- stacks: AWQ -> GPTQ (awq as a transform, quantize: false); SmoothQuant -> GPTQ at W8A8 and W4A8;
- activations: naive per-tensor W8A8 (the baseline); W8A8 and W4A8 with smoothquant, zeroquant; fp8 W8A8.

    nice -n 10 python benchmarks/method_table.py --nsamples 32 --seqlen 512 --max-windows 32 --bits 3,2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from quantshift.checkpoint import versions, write_json_atomic
from quantshift.data.calibset import build_calibset
from quantshift.evaluation.perplexity import perplexity
from quantshift.methods import METHODS
from quantshift.models.load import load_model
from quantshift.pipeline import quantize_model
from quantshift.recipes import recipe_from_dict


def cells_for(bits: list[int], gs: int, act_formats: bool) -> list[tuple[str, str, dict]]:
    """(key, label, recipe) for every cell whose methods are registered."""
    have = set(METHODS.names())
    out: list[tuple[str, str, dict]] = [("fp", "fp32 reference", {})]
    for b in bits:
        fmt = f"W{b}A16 g{gs}"
        for m in ("rtn", "gptq", "awq", "quip"):
            if m in have:
                out.append((f"{m}|w{b}", f"{m} {fmt}", {"stages": [{m: {"wbits": b, "group_size": gs}}]}))
        if "spqr" in have:
            out.append((f"spqr|w{b}", f"spqr W{b} g16 + 3-bit stats + outliers", {"stages": [{"spqr": {"wbits": b}}]}))
        if {"awq", "gptq"} <= have:
            out.append(
                (
                    f"awq>gptq|w{b}",
                    f"awq -> gptq {fmt}",
                    {
                        "stages": [
                            {"awq": {"wbits": b, "group_size": gs, "quantize": False}},
                            {"gptq": {"wbits": b, "group_size": gs}},
                        ]
                    },
                )
            )
    if act_formats:
        # the baseline SmoothQuant is measured against: one scale per tensor for the weights and
        # for each token-batch of activations, no smoothing
        out.append(
            (
                "rtn|w8a8-naive",
                "naive W8A8 (per-tensor W, per-tensor dynamic A)",
                {"stages": [{"rtn": {"wbits": 8, "group_size": 0, "sym": True, "abits": 8, "act_per_token": False}}]},
            )
        )
        if "smoothquant" in have:
            out.append(
                ("smoothquant|w8a8", "smoothquant W8A8 (per-channel W, per-token A)", {"stages": ["smoothquant"]})
            )
            out.append(
                (
                    "smoothquant|w4a8",
                    f"smoothquant W4A8 g{gs}",
                    {"stages": [{"smoothquant": {"wbits": 4, "group_size": gs, "sym": False}}]},
                )
            )
        if {"smoothquant", "gptq"} <= have:
            out.append(
                (
                    "sq>gptq|w8a8",
                    "smoothquant -> gptq W8A8 (per-channel W)",
                    {
                        "stages": [
                            {"smoothquant": {"quantize": False}},
                            {"gptq": {"wbits": 8, "group_size": -1, "sym": True, "abits": 8}},
                        ]
                    },
                )
            )
            out.append(
                (
                    "sq>gptq|w4a8",
                    f"smoothquant -> gptq W4A8 g{gs}",
                    {
                        "stages": [
                            {"smoothquant": {"quantize": False}},
                            {"gptq": {"wbits": 4, "group_size": gs, "abits": 8}},
                        ]
                    },
                )
            )
        if "zeroquant" in have:
            out.append(("zeroquant|w8a8", f"zeroquant W8A8 g{gs}", {"stages": [{"zeroquant": {"group_size": gs}}]}))
            out.append(
                ("zeroquant|w4a8", f"zeroquant W4A8 g{gs}", {"stages": [{"zeroquant": {"wbits": 4, "group_size": gs}}]})
            )
        if "fp8" in have:
            out.append(("fp8|w8a8", "fp8 E4M3 W8A8 (per-channel W, per-token A)", {"stages": ["fp8"]}))
    return out


def bits_per_weight(modules: dict, recipe: dict) -> float | None:
    """Average storage bits per quantized weight: measured (SpQR reports its own), else codes +
    one fp16 scale (+ one fp16 zero when asymmetric) per group."""
    total = params = 0.0
    for m in modules.values():
        info = m.info
        if "bits" in info and "params" in info:  # SpQR: measured, outliers included
            total += info["bits"]
            params += info["params"]
            continue
        qw = m.qweight
        if qw is not None:
            n = qw.codes.numel()
            stats = qw.scale.numel() * (16 if qw.spec.dtype == "fp8" or qw.spec.symmetric else 32)
            total += n * qw.spec.bits + stats
            params += n
        elif "wbits" in info and "transform" in info:  # QuIP: dense fake-quant weight, nominal count
            fmt = recipe["stages"][0]["quip"]
            gs = fmt.get("group_size", -1)
            per_group = 32 if gs > 0 else 0
            total += info["wbits"] + (per_group / gs if gs > 0 else 0)
            params += 1
    return total / params if params else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikipedia")
    ap.add_argument("--eval", default="wikipedia")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = every held-out window")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--only",
        default="",
        help="comma list of cell-key prefixes to run (e.g. fp,rtn,spqr); "
        "a prefix matching nothing (e.g. none) just re-renders the Markdown from the JSON",
    )
    ap.add_argument("--no-act", action="store_true", help="skip the W8A8 / W4A8 cells")
    ap.add_argument("--out", default="docs/results/methods")
    args = ap.parse_args()

    out = Path(args.out)
    res_file = out.with_suffix(".json")
    results = json.loads(res_file.read_text()) if res_file.is_file() else {"cells": {}}
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "out")}
    if results.get("settings") and {
        k: results["settings"].get(k)
        for k in ("model", "calib", "eval", "group_size", "nsamples", "seqlen", "max_windows", "seed")
    } != {
        k: settings[k] for k in ("model", "calib", "eval", "group_size", "nsamples", "seqlen", "max_windows", "seed")
    }:
        raise SystemExit(f"{res_file} holds results of other settings; pass another --out")
    results["settings"] = settings | {"versions": versions()}
    only = [p for p in args.only.split(",") if p]
    cells = cells_for([int(b) for b in args.bits.split(",")], args.group_size, not args.no_act)
    calib = None
    for key, label, recipe in cells:
        if key in results["cells"] or (only and not any(key.startswith(p) for p in only)):
            continue
        t0 = time.time()
        lm = load_model(args.model, "cpu")
        qsec, bits, outliers = 0.0, 16.0, None
        if recipe:
            rec = recipe_from_dict(recipe)
            cal = None
            if rec.needs_calibration:
                if calib is None:
                    calib = build_calibset(
                        args.calib,
                        lm.tokenizer,
                        args.nsamples,
                        args.seqlen,
                        args.seed,
                        add_bos=lm.needs_bos,
                        tokenizer_name=args.model,
                    )
                cal = calib
            res = quantize_model(lm, rec, cal, progress=False)
            qsec = res.engine.seconds
            bits = bits_per_weight(res.engine.modules, recipe)
            n_out = sum(m.info.get("outliers", 0) for m in res.engine.modules.values())
            outliers = n_out or None
        ppl = perplexity(
            lm.model,
            lm.tokenizer,
            args.eval,
            seqlen=args.seqlen,
            max_windows=args.max_windows or None,
            add_bos=lm.needs_bos,
            progress=False,
        )
        results["cells"][key] = {
            "label": label,
            "recipe": recipe,
            "ppl": ppl.to_dict(),
            "bits_per_weight": bits,
            "outliers": outliers,
            "quantize_seconds": round(qsec, 1),
            "seconds": round(time.time() - t0, 1),
        }
        write_json_atomic(res_file, results)
        out.with_suffix(".md").write_text(render(results, cells))
        print(
            f"{key:22s} ppl {ppl.ppl:9.3f}  bits {bits if bits is None else round(bits, 3)}  quantize {qsec:.0f}s",
            flush=True,
        )
        del lm
    out.with_suffix(".md").write_text(render(results, cells))


NOTES = """
## How to read the SpQR and QuIP rows

- **SpQR** runs at its own format, not g64: groups of 16 whose scales and zeros are rounded to
  3 bits in runs of 16 rows (fp16 minimum and step per run), GPTQ error feedback in act-order,
  and at most 1% of the weights kept as fp16 outliers (those whose sensitivity
  ((w - q) / [chol H^-1]_jj)^2 exceeds 0.2 x the layer's typical sensitivity). Its bits/weight
  is measured: about wbits + 0.625 for codes and statistics plus 32 bits per outlier, so
  compare SpQR W3 with the W3/W4 rows of the other methods by bits, not by the W label.
- **QuIP** rotates each linear on both sides (randomized Hadamard; Kronecker with a small random
  orthogonal factor where the size is not a power of two: 576 = 64 x 9, 1536 = 512 x 3,
  192 = 64 x 3), rounds with LDLQ (= GPTQ on the rotated weight and Hessian) on a g64 grid *in
  the rotated basis*, and stores the un-rotated fake-quant weight. A packed export would need the
  transforms (seeds are in the report).
- `[quip, gptq]` is rejected: QuIP already includes LDLQ, and a later weight quantizer would
  round the un-rotated weight onto a new grid. `quip` with `rounding: nearest` is the
  incoherence-only ablation.
"""


def render(results: dict, cells: list[tuple[str, str, dict]]) -> str:
    s = results["settings"]
    got = results["cells"]
    fp = got.get("fp", {}).get("ppl", {})
    lines = [
        f"# Quantization methods on {s['model']}",
        "",
        f"Calibration: `{s['calib']}`, {s['nsamples']} x {s['seqlen']} tokens, seed {s['seed']}. Held-out `{s['eval']}` "
        f"perplexity, windows of {s['seqlen']} tokens ({fp.get('windows', '?')} windows, {fp.get('tokens', '?')} scored "
        "tokens). Generated by `benchmarks/method_table.py`; raw numbers in the JSON next to this file.",
        "",
        "Bits/weight: codes + one fp16 scale (+ one fp16 zero if asymmetric) per group; SpQR's is measured "
        "(codes, 3-bit first-level and fp16 second-level statistics, 32 bits per outlier); QuIP's is nominal "
        "(its grid lives in the rotated basis).",
        "",
        "| cell | bits/weight | ppl | x fp | quantize s |",
        "|---|---|---|---|---|",
    ]
    base = fp.get("ppl")
    for key, label, _ in cells:
        c = got.get(key)
        if c is None:
            continue
        p = c["ppl"]["ppl"]
        ratio = "" if base is None or not math.isfinite(p) else f"{p / base:.2f}"
        b = c.get("bits_per_weight")
        lines.append(
            f"| {label} | {'' if b is None else f'{b:.2f}'} | {p:.2f} | {ratio} | {c['quantize_seconds']:.0f} |"
        )
    missing = [label for key, label, _ in cells if key not in got]
    if missing:
        lines += ["", "Not run in this budget: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n" + NOTES


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
