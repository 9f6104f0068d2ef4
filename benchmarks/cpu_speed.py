"""CPU speed of quantshift's compute paths, side by side in one run: float32 vs bf16 autocast.

Prints, on this machine and in this process:
  1. the matmul peak: GFLOP/s of a 4096 x 576 @ 576 x 1536 GEMM (a smollm2 MLP product) in
     float32 and bf16, median of repeats;
  2. evaluation: held-out perplexity tokens/s of smollm2-135m (8 windows x 512 of wikipedia) in
     float32 and in bf16 autocast, median and spread of repeats, the perplexity each gives, and
     the fraction of its precision's GEMM peak the model's matrix FLOPs reach;
  3. GPTQ W3 g64 on smollm2-135m with 128 x 512 wikipedia calibration tokens: seconds per model
     and per decoder block, for bf16 autocast, bf16 without replaying finished sub-modules (the
     engine's pass saving), and float32, the fraction of the GEMM peak each reaches, and the
     quantized model's held-out wikipedia perplexity (16 x 512, seed 42).
Matrix FLOPs are counted with torch's FlopCounterMode on the same work (GPTQ: on 8 calibration
windows, scaled to the run's token count; the column loop's FLOPs do not scale and are small).
The 1-minute load average is printed before and after: numbers taken while it was above ~0.5
shared the cores with something else.

    python benchmarks/cpu_speed.py                       # ~12 minutes on 2 cores
    python benchmarks/cpu_speed.py --gptq bf16 --nsamples 32    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

GPTQ_VARIANTS = ("bf16", "bf16-no-replay", "fp32")


def gemm_peak(dtype: torch.dtype, repeats: int = 7) -> float:
    a = torch.randn(4096, 576).to(dtype)
    b = torch.randn(576, 1536).to(dtype)
    flops = 2 * 4096 * 576 * 1536
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        ts.append((time.perf_counter() - t) / 10)
    return flops / statistics.median(ts) / 1e9


def matrix_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def eval_speed(precision, windows: torch.Tensor, repeats: int) -> dict:
    from quantshift.evaluation.perplexity import window_nlls
    from quantshift.models.load import load_model

    lm = load_model("smollm2-135m", "cpu", precision)
    run = lambda: window_nlls(lm.model, windows, 8, progress=False, compute=lm.compute)  # noqa: E731
    nll = run()  # warm-up, and the perplexity
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    flops = matrix_flops(run)
    med = statistics.median(ts)
    return {
        "precision": lm.precision.name,
        "tok_s": windows.numel() / med,
        "tok_s_range": (windows.numel() / max(ts), windows.numel() / min(ts)),
        "ppl": float(torch.exp(nll.sum() / (windows.shape[0] * (windows.shape[1] - 1)))),
        "gflops": flops / med / 1e9,
    }


def gptq_speed(variant: str, nsamples: int, seqlen: int) -> dict:
    from quantshift.data.calibset import build_calibset
    from quantshift.evaluation.perplexity import perplexity
    from quantshift.models.load import load_model
    from quantshift.quant.engine import BlockEngine
    from quantshift.recipes import recipe_from_dict

    dtype = "float32" if variant == "fp32" else "auto"
    recipe = recipe_from_dict({"stages": [{"gptq": {"wbits": 3, "group_size": 64}}]})

    def quantize(n: int):
        lm = load_model("smollm2-135m", "cpu", dtype)
        cal = build_calibset("wikipedia", lm.tokenizer, n, seqlen, 42, tokenizer_name="smollm2-135m")
        eng = BlockEngine(
            lm.model,
            lm.arch,
            [s.build() for s in recipe.stages],
            "cpu",
            progress=False,
            autocast=lm.precision.autocast,
            reuse_outputs=variant != "bf16-no-replay",
        )
        t = time.perf_counter()
        with torch.no_grad():
            res = eng.run(cal.input_ids)
        return time.perf_counter() - t, [b["seconds"] for b in res.blocks], lm

    secs, blocks, lm = quantize(nsamples)
    ppl = perplexity(
        lm.model, lm.tokenizer, "wikipedia", seqlen=512, max_windows=16, progress=False, compute=lm.compute
    ).ppl
    small = 8
    flops = matrix_flops(lambda: quantize(small)) * nsamples / small
    return {
        "variant": variant,
        "seconds": secs,
        "block_s": statistics.fmean(blocks),
        "ppl": ppl,
        "block_s_range": (min(blocks), max(blocks)),
        "gflops": flops / secs / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gptq", default=",".join(GPTQ_VARIANTS), help="GPTQ variants: " + ", ".join(GPTQ_VARIANTS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from quantshift.data.calibset import token_stream
    from quantshift.data.sources import get_source
    from quantshift.evaluation.perplexity import windows_of
    from quantshift.models.load import load_model
    from quantshift.models.precision import cpu_flags, native_bf16_cpu

    load0 = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; bf16 matrix units: "
        f"{native_bf16_cpu()} ({', '.join(sorted(f for f in cpu_flags() if 'bf16' in f or 'amx' in f)) or 'none'})"
    )
    print(
        f"load average (1 min) at start: {load0:.2f}"
        + ("  << the machine is busy: timings describe it, not the code" if load0 > 0.5 else "")
    )
    peak = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    print(
        f"\nGEMM 4096x576 @ 576x1536: float32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s "
        f"({peak['bfloat16'] / peak['float32']:.2f}x)"
    )

    tok = load_model("smollm2-135m", "cpu", "float32").tokenizer
    win = windows_of(token_stream(get_source("wikipedia"), "heldout", tok), args.seqlen, None, 8)
    ev = [eval_speed(p, win, args.repeats) for p in ("float32", "auto")]
    print(
        f"\nevaluation: held-out perplexity, {win.shape[0]} x {win.shape[1]} wikipedia tokens, batch 8, "
        f"median of {args.repeats}"
    )
    print(f"{'precision':28s} {'tokens/s':>9s} {'range':>13s} {'ppl':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for r in ev:
        pk = peak["bfloat16" if "bfloat16" in r["precision"] else "float32"]
        lo, hi = r["tok_s_range"]
        print(
            f"{r['precision']:28s} {r['tok_s']:9.0f} {lo:6.0f}-{hi:<6.0f} {r['ppl']:8.3f} {r['gflops']:8.0f} "
            f"{r['gflops'] / pk:8.0%}"
        )
    print(
        f"bf16 / float32: {ev[1]['tok_s'] / ev[0]['tok_s']:.2f}x tokens/s, perplexity "
        f"{ev[1]['ppl'] / ev[0]['ppl'] - 1:+.3%}"
    )

    rows = []
    variants = [v.strip() for v in args.gptq.split(",") if v.strip()]
    if variants:
        print(f"\nGPTQ W3 g64, smollm2-135m (30 blocks), {args.nsamples} x {args.seqlen} wikipedia calibration tokens")
        print(
            f"{'variant':16s} {'s/model':>8s} {'s/block':>8s} {'block range':>12s} {'GFLOP/s':>8s} {'of peak':>8s} "
            f"{'ppl':>8s}"
        )
        for v in variants:
            r = gptq_speed(v, args.nsamples, args.seqlen)
            rows.append(r)
            pk = peak["float32" if v == "fp32" else "bfloat16"]
            print(
                f"{v:16s} {r['seconds']:8.1f} {r['block_s']:8.2f} {r['block_s_range'][0]:5.2f}-{r['block_s_range'][1]:<6.2f}"
                f" {r['gflops']:8.0f} {r['gflops'] / pk:8.0%} {r['ppl']:8.3f}",
                flush=True,
            )
        by = {r["variant"]: r for r in rows}
        if "bf16" in by and "fp32" in by:
            print(f"bf16 vs fp32: {by['fp32']['seconds'] / by['bf16']['seconds']:.2f}x faster per model")
        if "bf16" in by and "bf16-no-replay" in by:
            print(f"replaying finished sub-modules: {by['bf16-no-replay']['seconds'] / by['bf16']['seconds']:.2f}x")
    print(f"\nload average (1 min) at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak": peak, "eval": ev, "gptq": rows, "load": [load0, os.getloadavg()[0]]}, f, indent=1)


if __name__ == "__main__":
    main()
