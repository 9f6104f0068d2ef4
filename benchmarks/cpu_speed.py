"""CPU speed of quantshift's compute paths, float32 and bf16 autocast, this code against a baseline
commit, side by side in one run.

Measures, each in a fresh process with --threads torch threads (default 1: what one `run --jobs 2`
worker gets on 2 cores), alternating baseline and current code so drift hits both alike:
  - scoring: held-out perplexity tokens/s of smollm2-135m, 8 windows x 512 wikipedia tokens,
    batch 8, median of --repeats (after a warm-up), and the perplexity it gives;
  - GPTQ W3 g64 (the demo's method) with --nsamples x 512 wikipedia calibration tokens: seconds per
    decoder block (mean over the 30 blocks) and per model, and the perplexity of the result
    (8 x 512 held-out windows);
in float32 and, where the CPU has bf16 matrix units, in bf16 autocast ("auto"). Also the float32
and bf16 GEMM rates. The 1-minute load average is printed before and after: numbers taken while it
was above ~0.5 shared the cores with something else.

    python benchmarks/cpu_speed.py --baseline d3f0dfb        # before/after, ~15 minutes on 2 cores
    python benchmarks/cpu_speed.py --what score --repeats 3  # this code only, scoring only
    python benchmarks/cpu_speed.py --fit                     # the constants of `check`'s estimate

--fit measures this code's float32 GEMM rate, scoring rate and GPTQ seconds per block at --nsamples
and twice that, per precision, and prints the constants of quantshift.preview's time model
(Q_PER_TOKEN: a calibration token's cost per block in scored-token units; FIXED_TOKENS: the part
of a block that does not grow with tokens, in the same units). preview.py takes the float32 pair
from here; its bf16 pair comes from study runs (docs/performance.md): two points at 16 and 32 x 512
on an idle worker under-count 128 x 512 in a study by ~14%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gemm_rate(dtype_name: str, repeats: int = 7) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(4096, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        ts.append((time.perf_counter() - t) / 10)
    return 2 * 4096 * 576 * 1536 / statistics.median(ts) / 1e9


def heldout(tok, n: int = 8):
    from quantshift.data.calibset import token_stream
    from quantshift.data.sources import get_source
    from quantshift.evaluation.perplexity import windows_of

    return windows_of(token_stream(get_source("wikipedia"), "heldout", tok), 512, None, n)


def measure_score(dtype: str, repeats: int) -> dict:
    import torch

    from quantshift.evaluation.perplexity import window_nlls
    from quantshift.models.load import load_model

    lm = load_model("smollm2-135m", "cpu", dtype)
    win = heldout(lm.tokenizer)
    with torch.no_grad():
        nll = window_nlls(lm.model, win, 8, progress=False, compute=lm.compute)  # warm-up, and the ppl
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            window_nlls(lm.model, win, 8, progress=False, compute=lm.compute)
            ts.append(time.perf_counter() - t)
    ppl = float(torch.exp(nll.sum() / (win.shape[0] * (win.shape[1] - 1))))
    return {"tok_s": [win.numel() / t for t in ts], "ppl": ppl, "precision": lm.precision.name}


def measure_gptq(dtype: str, nsamples: int) -> dict:
    import torch

    from quantshift.data.calibset import build_calibset
    from quantshift.evaluation.perplexity import window_nlls
    from quantshift.models.load import load_model
    from quantshift.quant.engine import BlockEngine
    from quantshift.recipes import recipe_from_dict

    recipe = recipe_from_dict({"stages": [{"gptq": {"wbits": 3, "group_size": 64}}]})
    lm = load_model("smollm2-135m", "cpu", dtype)
    cal = build_calibset("wikipedia", lm.tokenizer, nsamples, 512, 42, tokenizer_name="smollm2-135m")
    eng = BlockEngine(
        lm.model, lm.arch, [s.build() for s in recipe.stages], "cpu", progress=False, autocast=lm.precision.autocast
    )
    t = time.perf_counter()
    with torch.no_grad():
        res = eng.run(cal.input_ids)
        secs = time.perf_counter() - t
        win = heldout(lm.tokenizer)
        nll = window_nlls(lm.model, win, 8, progress=False, compute=lm.compute)
    blocks = [b["seconds"] for b in res.blocks]
    ppl = float(torch.exp(nll.sum() / (win.shape[0] * (win.shape[1] - 1))))
    return {"seconds": secs, "block_s": statistics.fmean(blocks), "ppl": ppl, "precision": lm.precision.name}


def one(args: argparse.Namespace) -> None:
    """Child mode: one measurement, printed as a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    kind, dtype = args.one.split(":")
    if kind == "score":
        out = measure_score(dtype, args.repeats)
    elif kind == "gptq":
        out = measure_gptq(dtype, args.nsamples)
    elif kind == "probe":  # the scoring rate as `quantshift check` measures it (machine_speed)
        from quantshift.machine_speed import _score_rate

        out = {"tok_s": [_score_rate(dtype) for _ in range(args.repeats)]}
    else:
        out = {"gflops": gemm_rate(dtype)}
    print("RESULT " + json.dumps(out), flush=True)


def run_child(src: Path, what: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--one", what, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--nsamples", str(args.nsamples)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"{what} with {src} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[7:])


def baseline_tree(ref: str) -> Path:
    """The baseline commit's sources, exported to a temporary directory."""
    d = Path(tempfile.mkdtemp(prefix="qs-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(d)], input=archive.stdout, check=True)
    return d / "src"


def fmt(kind: str, r: dict) -> str:
    if kind == "score":
        ts = r["tok_s"]
        return f"{statistics.median(ts):6.0f} tok/s ({min(ts):.0f}-{max(ts):.0f}) ppl {r['ppl']:.4f}"
    if kind == "gptq":
        return f"{r['block_s']:5.2f} s/block ({r['seconds']:5.1f} s/model) ppl {r['ppl']:.4f}"
    return f"{r['gflops']:6.0f} GFLOP/s"


def speed(kind: str, r: dict) -> float:
    """Higher is faster."""
    if kind == "score":
        return statistics.median(r["tok_s"])
    return 1.0 / r["block_s"] if kind == "gptq" else r["gflops"]


def fit(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from quantshift.models.capability import native_bf16_cpu

    src = ROOT / "src"
    load0 = os.getloadavg()[0]
    gemm = run_child(src, "gemm:float32", args)["gflops"]
    print(f"load average at start {load0:.2f}; float32 GEMM {gemm:.0f} GFLOP/s ({args.threads} thread(s))")
    n1, n2 = args.nsamples, 2 * args.nsamples
    for dtype, prec in [("float32", "float32")] + ([("auto", "bfloat16")] if native_bf16_cpu() else []):
        rate = statistics.median(run_child(src, f"probe:{dtype}", args)["tok_s"])
        e = 1.0 / (rate * 30)
        b1 = run_child(src, f"gptq:{dtype}", args)["block_s"]
        b2 = run_child(src, f"gptq:{dtype}", argparse.Namespace(**{**vars(args), "nsamples": n2}))["block_s"]
        t1, t2 = n1 * 512, n2 * 512
        q = (b2 - b1) / ((t2 - t1) * e)
        solve = b1 - t1 * e * q
        print(
            f"{prec}: scoring {rate:.0f} tok/s (the probe's measurement); GPTQ {b1:.2f} s/block at {n1} x 512, {b2:.2f} at {n2} x 512 -> "
            f"Q_PER_TOKEN {q:.2f}, FIXED_TOKENS {solve / e:.0f} (REF_GEMM_FP32 {gemm:.0f})",
            flush=True,
        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, help="git ref to compare against (default: this code only)")
    ap.add_argument("--what", default="gemm,score,gptq", help="any of gemm, score, gptq")
    ap.add_argument("--dtypes", default=None, help="float32,auto (default; auto only with bf16 units)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens (the demo: 16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--fit", action="store_true", help="print the estimate's constants (see the module doc)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    if args.fit:
        return fit(args)
    sys.path.insert(0, str(ROOT / "src"))
    from quantshift.models.capability import cpu_flags, native_bf16_cpu

    flags = sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f or f == "avx512_vnni")
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] + (["auto"] if native_bf16_cpu() else [])
    trees = {"current": ROOT / "src"}
    if args.baseline:
        trees = {f"baseline {args.baseline}": baseline_tree(args.baseline), **trees}
    load0 = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, {args.threads} torch thread(s) per measurement; flags: {', '.join(flags) or 'none'}")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    rows = []
    for kind in [k for k in ("gemm", "score", "gptq") if k in args.what.split(",")]:
        for dtype in ["float32", "bfloat16"] if kind == "gemm" else dtypes:
            order = list(trees.items())
            got: dict[str, list[dict]] = {name: [] for name in trees}
            passes = 2 if args.baseline and kind != "gptq" else 1
            for p in range(passes):  # alternate: baseline, current, then current, baseline
                for name, src in order if p % 2 == 0 else order[::-1]:
                    got[name].append(run_child(src, f"{kind}:{dtype}", args))
            for name in trees:
                best = max(got[name], key=lambda r: speed(kind, r))
                rows.append({"kind": kind, "dtype": dtype, "code": name, **best})
                print(f"{kind:6s} {dtype:8s} {name:22s} {fmt(kind, best)}", flush=True)
            if args.baseline:
                base, cur = (max(got[n], key=lambda r: speed(kind, r)) for n in trees)
                print(f"{'':6s} {'':8s} {'current / baseline':22s} {speed(kind, cur) / speed(kind, base):.2f}x faster")
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load": [load0, load1], "flags": flags}, indent=1))


if __name__ == "__main__":
    main()
