"""How fast this machine runs quantshift's work, measured once and kept: what `quantshift check`'s
time estimate scales by.

The probe runs `workers` processes at once, each with its share of the cores (as `run --jobs`
does, so cores, memory bandwidth and caches are shared the way a study shares them), and each
measures, after a warm-up:
  - a float32 GEMM rate and a bf16 one (GFLOP/s of a smollm2 MLP-sized product);
  - the held-out scoring rate of the bundled smollm2-135m (tokens/s over 2 x 512 wikipedia
    tokens, batch 2) in float32 and, where the CPU has bf16 matrix units, in bf16 autocast;
  - its greedy decoding rate in the same precisions (tokens/s generated with a KV cache, batch 8,
    as lm-eval generates a task's answers): a generated token costs far more than a scored one.
That takes ~40 s on 2 cores; the result is cached under <cache>/machine-speed/ keyed by the CPU
model, its matrix flags, the torch version and the thread layout, so a machine is measured once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

PROBE_VERSION = 2  # bump when what the probe measures changes
PROBE_MODEL = "smollm2-135m"
PROBE_BLOCKS = 30  # smollm2-135m's decoder blocks: a scored token per block is the estimate's unit
PROBE_WINDOWS = (2, 512)
PROBE_DECODE = (8, 64, 32)  # batch, prompt tokens, generated tokens


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key(workers: int, threads: int) -> dict[str, Any]:
    import torch

    from .models.capability import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "fma")))
    return {
        "version": PROBE_VERSION,
        "cpu": cpu_model(),
        "flags": flags,
        "cpus": os.cpu_count(),
        "torch": torch.__version__.split("+")[0],
        "workers": workers,
        "threads": threads,
    }


def _gemm_rate(dtype: Any, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(4096, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        ts.append((time.perf_counter() - t) / 4)
    return 2 * 4096 * 576 * 1536 / statistics.median(ts) / 1e9


def _score_rate(dtype: str) -> float:
    import torch

    from .data.calibset import token_stream
    from .data.sources import get_source
    from .evaluation.perplexity import window_nlls, windows_of
    from .models.load import load_model

    lm = load_model(PROBE_MODEL, "cpu", dtype)
    n, seqlen = PROBE_WINDOWS
    win = windows_of(token_stream(get_source("wikipedia"), "heldout", lm.tokenizer), seqlen, None, n)
    with torch.no_grad():
        window_nlls(lm.model, win, n, progress=False, compute=lm.compute)  # warm-up
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            window_nlls(lm.model, win, n, progress=False, compute=lm.compute)
            ts.append(time.perf_counter() - t)
    return win.numel() / min(ts)


def _decode_rate(dtype: str) -> float:
    import torch

    from .models.load import load_model

    lm = load_model(PROBE_MODEL, "cpu", dtype)
    generate: Any = getattr(lm.model, "generate")  # noqa: B009 (typed as a Tensor by nn.Module)
    batch, prompt, new = PROBE_DECODE
    ids = torch.randint(100, 10000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    kwargs = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, use_cache=True)
    with torch.no_grad(), lm.compute():
        generate(ids, attention_mask=torch.ones_like(ids), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            ts.append(time.perf_counter() - t)
    return batch * new / min(ts)


def _probe_worker(threads: int, start_at: float) -> dict[str, float]:
    """One worker's rates (run in its own process; `start_at`: a shared wall-clock start, so the
    workers measure at the same time)."""
    import torch

    from .models.capability import native_bf16_cpu

    torch.set_num_threads(threads)
    time.sleep(max(0.0, start_at - time.time()))
    out = {
        "gemm_float32": _gemm_rate(torch.float32),
        "score_float32": _score_rate("float32"),
        "decode_float32": _decode_rate("float32"),
    }
    if native_bf16_cpu():
        out["gemm_bfloat16"] = _gemm_rate(torch.bfloat16)
        out["score_bfloat16"] = _score_rate("auto")
        out["decode_bfloat16"] = _decode_rate("auto")
    return out


def measure(workers: int, threads: int) -> dict[str, float]:
    """Every worker's rates, measured at once in `workers` processes; the mean over workers."""
    import concurrent.futures as cf
    import multiprocessing as mp

    start_at = time.time() + 8.0  # time for the processes to import torch and transformers
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        rows = list(pool.map(_probe_worker, [threads] * workers, [start_at] * workers))
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def machine_speed(cache: Path, workers: int, threads: int, echo: Any = None) -> dict[str, Any]:
    """This machine's rates for `workers` processes of `threads` threads: read from the cache, or
    measured now (~40 s) and cached. {"key": ..., "rates": {gemm_float32, score_float32, ...}}."""
    key = probe_key(workers, threads)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / "machine-speed" / f"{name}.json"
    try:
        found = json.loads(path.read_text())
        if found.get("key") == key:
            return dict(found)
    except (OSError, ValueError):
        pass
    if echo is not None:
        echo(f"measuring this machine's speed once ({workers} x {threads} threads, ~40 s; cached in {path.parent})")
    record = {"key": key, "rates": measure(workers, threads), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    from .atomic import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record
