"""RTN vs GPTQ held-out perplexity on a bundled model, for several calibration sources.

Every cell reloads the fp model, quantizes it, and scores held-out text with the GPTQ
perplexity protocol (non-overlapping windows). Results are appended to a JSON file as each
cell finishes (atomic writes), so an interrupted run resumes where it stopped.

    python benchmarks/rtn_vs_gptq.py --model smollm2-135m --calibs wikipedia,news,pydocs \
        --bits 4,3,2 --group-size 64 --nsamples 128 --seqlen 512 --out docs/results/rtn-vs-gptq
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantshift.checkpoint import versions, write_json_atomic
from quantshift.data.calibset import build_calibset
from quantshift.evaluation.perplexity import perplexity
from quantshift.models.load import load_model
from quantshift.pipeline import quantize_model, save
from quantshift.recipes import recipe_from_cli


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibs", default="wikipedia,news,pydocs")
    ap.add_argument("--eval", default="wikipedia", help="held-out sources to score")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = every held-out window")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="docs/results/rtn-vs-gptq")
    ap.add_argument(
        "--save-models",
        default="",
        help="also save each quantized model under this directory "
        "(e.g. to run `quantshift eval DIR --suite offline` on it)",
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    out = Path(args.out)
    res_file = out.with_suffix(".json")
    results = json.loads(res_file.read_text()) if res_file.is_file() else {"cells": {}}
    results["settings"] = vars(args) | {"versions": versions()}
    evals = args.eval.split(",")

    def score(lm) -> dict:
        return {
            src: perplexity(
                lm.model,
                lm.tokenizer,
                src,
                seqlen=args.seqlen,
                max_windows=args.max_windows or None,
                add_bos=lm.needs_bos,
                progress=False,
            ).to_dict()
            for src in evals
        }

    cells = [("fp", 16, "-")]
    for bits in [int(b) for b in args.bits.split(",")]:
        cells.append(("rtn", bits, "-"))
        cells += [("gptq", bits, c) for c in args.calibs.split(",")]
    for method, bits, calib in cells:
        key = f"{method}|w{bits}|{calib}"
        if key in results["cells"]:
            continue
        t0 = time.time()
        lm = load_model(args.model, "cpu")
        qtime = 0.0
        if method != "fp":
            rec = recipe_from_cli(method, wbits=bits, group_size=args.group_size)
            cal = (
                None
                if calib == "-"
                else build_calibset(
                    calib,
                    lm.tokenizer,
                    args.nsamples,
                    args.seqlen,
                    args.seed,
                    add_bos=lm.needs_bos,
                    tokenizer_name=args.model,
                )
            )
            qres = quantize_model(lm, rec, cal, progress=False)
            qtime = qres.engine.seconds
            if args.save_models:
                save(
                    lm,
                    qres,
                    Path(args.save_models) / f"{method}-w{bits}-{calib if calib != '-' else 'none'}",
                    overwrite=True,
                )
        results["cells"][key] = {
            "method": method,
            "wbits": bits,
            "calib": calib,
            "ppl": score(lm),
            "quantize_seconds": round(qtime, 1),
            "seconds": round(time.time() - t0, 1),
        }
        write_json_atomic(res_file, results)
        print(key, {s: round(v["ppl"], 3) for s, v in results["cells"][key]["ppl"].items()}, flush=True)
    out.with_suffix(".md").write_text(render(results, evals))


def render(results: dict, evals: list[str]) -> str:
    s = results["settings"]
    cells = results["cells"]
    lines = [
        f"# RTN vs GPTQ on {s['model']} (group {s['group_size']}, calibration {s['nsamples']} x {s['seqlen']}, seed {s['seed']})",
        "",
    ]
    for src in evals:
        fp = cells.get("fp|w16|-", {}).get("ppl", {}).get(src, {})
        tokens = fp.get("tokens", "?")
        lines += [
            f"## held-out `{src}` perplexity ({tokens} scored tokens; fp32 reference = {fp.get('ppl', float('nan')):.2f})",
            "",
            "| bits | RTN | " + " | ".join(f"GPTQ calib={c}" for c in s["calibs"].split(",")) + " |",
            "|---|---|" + "---|" * len(s["calibs"].split(",")),
        ]
        for bits in s["bits"].split(","):
            row = [cells.get(f"rtn|w{bits}|-", {}).get("ppl", {}).get(src, {}).get("ppl")]
            row += [
                cells.get(f"gptq|w{bits}|{c}", {}).get("ppl", {}).get(src, {}).get("ppl")
                for c in s["calibs"].split(",")
            ]
            lines.append(f"| W{bits} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
