"""Peak resident memory of a streaming GPTQ run with glibc's malloc arenas capped (mallopt
M_ARENA_MAX, set here before the run) and with glibc's default, which quantshift keeps,
alternating fresh processes side by side, with the load average.

    python benchmarks/allocator_arenas.py --runs 5

The model is the 51-block synthetic one of tests/test_streaming.py (~1.5 GB bf16, hidden 1,024),
quantized GPTQ W4 g128 under the test's cap. Each run prints the peak (VmHWM) less the process's
resident size after its imports, and its wall time. The peak has rare outliers (~+290 MB in about
one run in four or five), so use several runs; the model is deleted at the end unless --workdir.

Measured 2026-12-06 (2 cores, AMX, load 1.6-2.1), --runs 3: capped at 2 +635, +342, +341 MB
(106-115 s); glibc default +341, +341, +634 MB (100-120 s): the cap changes nothing, so
quantshift.models.shards.bound_allocator leaves the arenas alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r"""
import os, sys, time
import torch, transformers
from transformers.models.llama import modeling_llama
import quantshift.api, quantshift.evaluation.run
import psutil
base = psutil.Process().memory_info().rss
from quantshift import api
model, out, cap, calib, arenas = sys.argv[1:6]
if int(arenas):  # before any worker thread exists; 0 leaves glibc's default
    import ctypes, ctypes.util
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-8, int(arenas))  # M_ARENA_MAX
t = time.time()
api.quantize(model, "gptq", calib=calib, nsamples=4, seqlen=128, wbits=4, group_size=128,
             out=out, max_memory=cap, progress=False)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print((int(hwm.split()[1]) * 1024 - base) >> 20, round(time.time() - t, 1))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs of each variant, alternating")
    ap.add_argument("--arenas", type=int, default=2, help="the cap to compare with glibc's default")
    ap.add_argument("--workdir", default=None, help="where the synthetic model goes (default: a temp dir)")
    args = ap.parse_args()

    from quantshift.models.shards import ShardedTensors
    from quantshift.models.synthetic import SyntheticShape, write_synthetic

    work = Path(args.workdir or tempfile.mkdtemp(prefix="arenas-"))
    try:
        shape = SyntheticShape.for_params(750e6, hidden=1024, intermediate=2816, heads=8)
        model = write_synthetic(work / "syn", shape, shard_bytes=300 * 10**6, progress=False)
        bf16 = ShardedTensors(model).total_bytes()
        cap = f"cpu={int(0.35 * bf16) + 450 * 2**20}"  # as tests/test_streaming.py
        calib = work / "calib.txt"
        calib.write_text((Path(__file__).resolve().parents[1] / "README.md").read_text() * 2)
        script = work / "run.py"
        script.write_text(RUN)
        variants = {f"arenas capped at {args.arenas}": args.arenas, "glibc default": 0}
        seen: dict[str, list[tuple[int, float]]] = {k: [] for k in variants}
        print(f"model {bf16 / 2**20:.0f} MiB bf16, cap {cap}; load average {os.getloadavg()}")
        for r in range(args.runs):
            for name, arenas in variants.items():
                shutil.rmtree(work / "q", ignore_errors=True)
                p = subprocess.run(
                    [sys.executable, str(script), str(model), str(work / "q"), cap, str(calib), str(arenas)],
                    capture_output=True,
                    text=True,
                )
                if p.returncode != 0:
                    sys.exit(f"run failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
                mb, secs = p.stdout.split()[-2:]
                seen[name].append((int(mb), float(secs)))
                print(f"run {r + 1} {name:22s} peak +{mb} MB  {secs} s  load {os.getloadavg()[0]:.2f}", flush=True)
        for name, rows in seen.items():
            peaks = sorted(m for m, _ in rows)
            secs = sorted(s for _, s in rows)
            print(
                f"{name:22s} peak +{peaks[0]}..+{peaks[-1]} MB (median +{peaks[len(peaks) // 2]}), "
                f"{secs[0]:.0f}-{secs[-1]:.0f} s"
            )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
