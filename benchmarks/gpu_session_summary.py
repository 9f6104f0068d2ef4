"""benchmarks/gpu_session.sh's first and last steps.

    python benchmarks/gpu_session_summary.py --device cuda        # what quantshift chooses there, and why
    python benchmarks/gpu_session_summary.py --out DIR --mode gpu # DIR/gpu-session.json from the steps' files

The summary gathers, from the files the steps left in DIR: each step's exit code, seconds and
limit (steps.tsv); the device and its choices (device.log, nvidia-smi.txt); the pytest summary
line (pytest.log); the kernels' errors and times (kernels.json); GPTQ seconds per layer, its
ratio to llm-compressor's 7.28 s per Llama-2-7B layer on an H100, and peak memory (gptq.json);
decode tok/s of fp16 and W4 with their fraction of the bandwidth bound (decode.json); each stage's
peak device and host memory of the model larger than the device cap (ltm.json).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

LLM_COMPRESSOR_H100_S_PER_LAYER = 7.28  # GPTQ, Llama-2-7B layer, 128 x 2048 calibration tokens


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def summarize(out: Path, mode: str) -> dict:
    steps = []
    for line in _text(out / "steps.tsv").splitlines():
        name, rc, ms, limit = line.split("\t")
        steps.append(
            {
                "step": name,
                "exit": int(rc),
                "seconds": int(ms) / 1e3,
                "limit_s": int(limit),
                "timed_out": int(rc) in (124, 137),
            }
        )
    result: dict = {
        "mode": mode,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": steps,
        "ok": bool(steps) and all(s["exit"] == 0 for s in steps),
        "seconds": round(sum(s["seconds"] for s in steps), 1),
    }
    smi = _text(out / "nvidia-smi.txt")
    result["device"] = {
        "choices": [ln for ln in _text(out / "device.log").splitlines() if ln.strip()],
        "nvidia_smi": smi.splitlines()[:20] if smi else None,
    }
    pyt = _text(out / "pytest.log")
    last = [ln for ln in pyt.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    counts = (
        {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", last[-1])}
        if last
        else {}
    )
    result["pytest_gpu"] = {"summary": last[-1].strip("= ") if last else None, **counts}
    kernels = _json(out / "kernels.json")
    if kernels:
        result["kernels"] = {
            "all_within_tolerance": kernels["all_within_tolerance"],
            "tolerance": kernels["tolerance"],
            "rows": kernels["rows"],
        }
    gptq = _json(out / "gptq.json")
    if gptq:
        row = next((r for r in gptq["rows"] if r.get("method") == "gptq"), {})
        s = row.get("seconds_per_layer")
        result["gptq"] = {
            "versions": gptq.get("versions"),
            "layers": row.get("layers"),
            "seconds_per_layer": s,
            "per_layer": row.get("per_layer"),
            "seconds_outside_layers": row.get("seconds_outside_layers"),
            "llm_compressor_h100_seconds_per_layer": LLM_COMPRESSOR_H100_S_PER_LAYER,
            "speedup_vs_llm_compressor_h100": LLM_COMPRESSOR_H100_S_PER_LAYER / s if s else None,
            "peak_cuda_bytes": row.get("peak_cuda_bytes"),
            "peak_rss_bytes": row.get("peak_rss_bytes"),
            "block_out_rel_err": row.get("block_out_rel_err"),
            "error": row.get("error"),
        }
    decode = _json(out / "decode.json")
    if decode:
        result["decode"] = {
            "versions": decode.get("versions"),
            "shape": decode.get("shape"),
            "copy_bandwidth_bytes_s": decode.get("copy_bandwidth_bytes_s"),
            "rows": [
                {
                    k: r.get(k)
                    for k in (
                        "variant",
                        "tok_s",
                        "bound_tok_s",
                        "fraction_of_bound",
                        "speedup_vs_float",
                        "bytes_per_token",
                    )
                }
                for r in decode.get("rows", [])
            ],
        }
    ltm = _json(out / "ltm.json")
    if ltm:
        result["larger_than_memory"] = {
            "max_memory": ltm.get("args", {}).get("max_memory"),
            "stages": {
                k: {
                    f: v.get(f)
                    for f in (
                        "wall_seconds",
                        "peak_rss",
                        "peak_device_bytes",
                        "model_bytes",
                        "dir_bytes",
                        "ppl",
                        "plan",
                    )
                }
                for k, v in ltm.get("stages", {}).items()
            },
        }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="print the device's capability and choices, and stop")
    ap.add_argument("--out", default=None, help="the session's output directory")
    ap.add_argument("--mode", default="gpu", choices=["gpu", "dry-run"])
    args = ap.parse_args(argv)
    if args.device:
        from quantshift.models.capability import detect

        print("\n".join(detect(args.device).lines()))
        return 0
    if not args.out:
        ap.error("give --device or --out")
    result = summarize(Path(args.out), args.mode)
    (Path(args.out) / "gpu-session.json").write_text(json.dumps(result, indent=2))
    g, d = result.get("gptq") or {}, result.get("decode") or {}
    if args.mode == "dry-run":
        print("dry run on a CPU: the numbers below check that each step runs; they are not measurements")
    print(
        f"gpu session ({args.mode}): {'ok' if result['ok'] else 'FAILED steps: ' + ', '.join(s['step'] for s in result['steps'] if s['exit'])}"
        f" in {result['seconds']:.0f}s; pytest -m gpu: {result['pytest_gpu']['summary']}"
    )
    if g.get("seconds_per_layer"):
        print(
            f"  GPTQ {g['seconds_per_layer']:.2f} s/layer ({g['speedup_vs_llm_compressor_h100']:.2f}x llm-compressor's "
            f"{LLM_COMPRESSOR_H100_S_PER_LAYER} s on an H100), peak CUDA {(g['peak_cuda_bytes'] or 0) / 2**30:.1f} GiB"
        )
    for r in d.get("rows", []):
        print(f"  decode {r['variant']}: {r['tok_s']:.1f} tok/s, {r['fraction_of_bound']:.2f} of the bandwidth bound")
    if "kernels" in result:
        print(f"  kernels within tolerance of fake-quant: {result['kernels']['all_within_tolerance']}")
    print(f"wrote {Path(args.out) / 'gpu-session.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
