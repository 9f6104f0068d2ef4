"""GPTQ W4 g64 variants against RTN on one calibration set and one set of held-out windows.

Why is default GPTQ W4 worse than RTN on smollm2-135m? Each variant changes one thing: column
order (act-order with static groups), damping, symmetric grids. Same calibration (16 x 512
`wikipedia`, seed 42) and the same 8 held-out windows of 512 tokens as benchmarks/method_table.py.

    python benchmarks/gptq_variants.py --out docs/results/gptq-w4-variants-16x512.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quantshift.checkpoint import versions, write_json_atomic
from quantshift.data.calibset import build_calibset
from quantshift.evaluation.perplexity import perplexity
from quantshift.models.load import load_model
from quantshift.pipeline import quantize_model
from quantshift.recipes import recipe_from_dict

VARIANTS = {
    "rtn": ("rtn", {}),
    # the paper's column order, which the ablations below vary (the default is act-order)
    "gptq": ("gptq", {"act_order": False, "static_groups": False}),
    "gptq act_order+static_groups": ("gptq", {"act_order": True, "static_groups": True}),
    "gptq damp 0.1": ("gptq", {"damp": 0.1, "act_order": False, "static_groups": False}),
    "gptq sym": ("gptq", {"sym": True, "act_order": False, "static_groups": False}),
    "rtn sym": ("rtn", {"sym": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--out", default="docs/results/gptq-w4-variants-16x512.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"cells": {}}
    results["settings"] = vars(args) | {"calib": "wikipedia", "eval": "wikipedia", "seed": 42, "versions": versions()}
    cal = None
    for name, (method, extra) in VARIANTS.items():
        if name in results["cells"]:
            continue
        lm = load_model(args.model, "cpu")
        if cal is None:
            cal = build_calibset(
                "wikipedia",
                lm.tokenizer,
                args.nsamples,
                args.seqlen,
                42,
                add_bos=lm.needs_bos,
                tokenizer_name=args.model,
            )
        t0 = time.time()
        cfg = {"wbits": args.wbits, "group_size": args.group_size} | extra
        quantize_model(
            lm, recipe_from_dict({"stages": [{method: cfg}]}), cal if method != "rtn" else None, progress=False
        )
        ppl = perplexity(
            lm.model,
            lm.tokenizer,
            "wikipedia",
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            add_bos=lm.needs_bos,
            progress=False,
        )
        results["cells"][name] = {
            "recipe": {method: cfg},
            "ppl": round(ppl.ppl, 3),
            "seconds": round(time.time() - t0, 1),
        }
        write_json_atomic(out, results)
        print(f"{name:32s} ppl {ppl.ppl:8.3f}", flush=True)


if __name__ == "__main__":
    main()
