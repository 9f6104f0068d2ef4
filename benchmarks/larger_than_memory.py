"""A model larger than this machine's memory through every stage: quantize (RTN W4, GPTQ W4),
save, reload packed, perplexity, one lm-eval task through accelerate's offload hooks.

    python benchmarks/larger_than_memory.py --params 15e9 --max-memory cpu=6GiB --json benchmarks/larger-than-memory.json
    python benchmarks/larger_than_memory.py --params 15e9 --device cuda --max-memory cpu=6GiB,cuda:0=8GiB

A synthetic Llama-shaped bf16 model (quantshift.models.synthetic: seeded random weights, the
bundled SmolLM2 tokenizer) is written first; each stage then runs in a fresh process that reports
its own peak resident memory (getrusage), the bytes it read from and wrote to disk (/proc/self/io:
real device I/O, page-cache hits excluded), its wall time and, on a GPU, torch's peak allocated
device memory. The load average is printed before and after. The synthetic model and the
quantized directories are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGE = r"""
import json, os, resource, sys, time
t0 = time.time()
import torch
from quantshift import api
stage, model, out, cap, device, calib = sys.argv[1:7]
spec = json.loads(sys.argv[7])
info = {}
if stage == "generate":
    from quantshift.models.synthetic import SyntheticShape, write_synthetic
    shape = SyntheticShape.for_params(spec["params"], hidden=spec["hidden"], intermediate=spec["intermediate"],
                                      heads=spec["heads"], kv_heads=spec["kv_heads"])
    write_synthetic(model, shape, shard_bytes=2 * 2**30, progress=False, tokenizer_dir=spec["tokenizer"])
    info = {"shape": shape.__dict__, "params": shape.params()}
elif stage.startswith("quantize"):
    method = stage.split("-", 1)[1]
    res = api.quantize(model, method, calib=calib, nsamples=4, seqlen=128, wbits=4, group_size=128, out=out,
                       overwrite=True, max_memory=cap, device=device, progress=False)
    info = {"plan": res.loaded.memory.lines() if res.loaded.memory else None,
            "seconds_engine": res.report.get("seconds")}
elif stage == "ppl":
    m = api.evaluate(out, ppl=spec["ppl"], max_windows=2, seqlen=128, backend="packed", max_memory=cap,
                     device=device, progress=False)
    key = next(k for k in m if k.startswith("ppl:"))
    info = {"ppl": m[key]["ppl"], "tokens": m[key]["tokens"]}
elif stage == "task":
    m = api.evaluate(out, tasks="movie_sentiment", limit=10, batch_size=16, backend="packed", max_memory=cap,
                     device=device, progress=False)
    key = next(iter(m))
    info = {"task": key, "acc": m[key]["acc"], "n": m[key]["n"]}
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
info.update(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds=time.time() - t0,
            read_bytes=int(io["read_bytes"]), write_bytes=int(io["write_bytes"]))
if torch.cuda.is_available() and device.startswith("cuda"):
    info["peak_device_bytes"] = torch.cuda.max_memory_allocated()
print("STAGE " + json.dumps(info))
"""


def run_stage(stage: str, model: Path, out: Path, cap: str, device: str, calib: Path, spec: str) -> dict:
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-c", STAGE, stage, str(model), str(out), cap, device, str(calib), spec],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        # torch's dispatcher errors list every backend after the message: keep the traceback's head
        err = r.stderr.splitlines()
        head = next((i for i, ln in enumerate(err) if ln.startswith("Traceback")), 0)
        raise SystemExit(f"stage {stage} failed:\n" + "\n".join(err[head : head + 40])[-4000:])
    line = next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("STAGE "))
    info = json.loads(line[len("STAGE ") :])
    info["wall_seconds"] = round(time.time() - t0, 1)
    return info


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=15e9, help="synthetic model size in parameters")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--intermediate", type=int, default=13824)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--max-memory", default="cpu=6GiB")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/quantshift-ltm"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--stages", default="generate,quantize-rtn,quantize-gptq,ppl,task")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model and quantized directories")
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="folder with tokenizer.json (default: the bundled SmolLM2's; a bare GPU image passes one)",
    )
    ap.add_argument("--ppl", default="wikipedia", help="perplexity data: an offline source or a text file")
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model, calib = work / "model", work / "calib.txt"
    calib.write_text((Path(__file__).resolve().parents[1] / "README.md").read_text())
    ppl = args.ppl
    if Path(ppl).is_file():  # any text file (a .md too): the scorer reads .txt
        ppl = str(work / "eval.txt")
        Path(ppl).write_text(Path(args.ppl).read_text())
    cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")][:1]
    result: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "cpu": cpu[0].split(":")[1].strip() if cpu else "?",
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_before": os.getloadavg(),
        "stages": {},
    }
    spec = json.dumps(
        {
            "params": args.params,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "tokenizer": str(args.tokenizer) if args.tokenizer else None,
            "ppl": ppl,
        }
    )
    try:
        for stage in args.stages.split(","):
            # ppl and task score the GPTQ directory, or the RTN one when they run before GPTQ
            scored = work / "q-gptq" if (work / "q-gptq").is_dir() else work / "q-rtn"
            out = scored if stage in ("ppl", "task") else work / f"q-{stage.split('-', 1)[-1]}"
            info = run_stage(stage, model, out, args.max_memory, args.device, calib, spec)
            if stage == "generate":
                info["model_bytes"] = du(model)
            elif stage.startswith("quantize"):
                info["dir_bytes"] = du(out)
            if stage in ("ppl", "task"):
                info["scored"] = out.name
            result["stages"][stage] = info
            if args.json:  # after every stage: an interrupted run keeps what it measured
                args.json.write_text(json.dumps(result, indent=2, default=str))
            gib = 2**30
            print(
                f"{stage:14s} wall {info['wall_seconds']:8.1f} s  peak RSS {info['peak_rss'] / gib:6.2f} GiB  "
                f"read {info['read_bytes'] / gib:7.2f} GiB  written {info['write_bytes'] / gib:7.2f} GiB"
                + (f"  device peak {info['peak_device_bytes'] / gib:.2f} GiB" if "peak_device_bytes" in info else "")
                + (
                    f"  ({', '.join(f'{k} {v}' for k, v in info.items() if k in ('ppl', 'acc', 'model_bytes', 'dir_bytes'))})"
                ),
                flush=True,
            )
    finally:
        result["load_after"] = os.getloadavg()
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average before {result['load_before']}, after {result['load_after']}")


if __name__ == "__main__":
    main()
