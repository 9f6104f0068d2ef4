"""Efficiency metrics of a model as loaded: size on disk and in memory, bytes of weights as a
packed export stores them, peak memory, prefill and decode throughput at several batch sizes,
and the memory-bandwidth bound of decoding.

- A quantized directory loaded with backend "fake" has dequantized float weights, so its speed
  is the float model's (`fake_quant: true` says so); backend "packed" runs the low-bit kernels.
- Every speed is the median of `repeats` runs, with min, max and quartiles of those runs.
- Prefill: one forward over [batch, prompt_len] random tokens with the KV cache on, logits of
  the last position only (what `generate` computes).
- Decode: greedy steps of one token per sequence after a `decode_prompt_len` prompt, with
  transformers' static KV cache (`cache="static"`: no per-step cache growth; needed by
  `compile`, which compiles the decode step with torch.compile and reports its time apart).
- Bandwidth bound: decoding reads every weight once per step, so tokens/s <= batch x copy
  bandwidth / weight bytes read per step; the bandwidth is measured in the same run by a large
  tensor copy (bytes read + written per second). KV-cache reads are left out (small here).
- Load: the 1-minute load average at start and end; a start above half the cores means other
  processes compete for the CPU, and the metrics carry a warning (`loaded: true`).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

LOAD_FRACTION = 0.5  # warn when the 1-minute load average exceeds this fraction of the cores
# variant -> (load_model backend, dtype of the float parts)
VARIANTS = {
    "fp32": ("fake", "float32"),
    "bf16": ("fake", "bfloat16"),
    "packed-fp32": ("packed", "float32"),
    "packed-bf16": ("packed", "bfloat16"),
    # + the output projection in int8 (llama.cpp's 4-bit files keep it at 8 bits: Q8_0)
    "packed-bf16-int8head": ("packed", "bfloat16"),
}
# a study's bench (evaluation.bench): small, so it adds seconds per model, not minutes
STUDY_BENCH = {
    "prefill_batches": [1],
    "decode_batches": [1],
    "prompt_len": 128,
    "decode_prompt_len": 32,
    "gen_len": 16,
    "repeats": 3,
    "copy_mib": 64,
}


def dir_bytes(path: str | Path | None) -> int | None:
    """Bytes of every file under a local model directory (None for hub ids not on disk)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def packed_weight_bytes(model: nn.Module, quant_info: dict | None, float_bytes: int = 2) -> dict[str, int]:
    """Bytes of the parameters as a packed export stores them (quant.storage.packed_size)."""
    from ..quant.storage import packed_size, specs_from_info

    return packed_size(model, specs_from_info(quant_info), float_bytes)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers, each storage once (tied weights), under their first name."""
    seen: set[int] = set()
    out = []
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def param_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def memory_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as loaded (packed codes included)."""
    return sum(t.numel() * t.element_size() for _, t in _tensors(model))


def decode_bytes_per_step(model: nn.Module) -> int:
    """Weight bytes one decode step reads: everything except an input embedding table that is
    not also the output layer (one row of it is read) and rotary tables."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    out = get_out() if callable(get_out) else None
    emb_w = getattr(emb, "weight", None)
    skip = {id(emb_w)} if emb_w is not None and getattr(out, "weight", None) is not emb_w else set()
    return sum(t.numel() * t.element_size() for n, t in _tensors(model) if id(t) not in skip and "rotary" not in n)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device | str, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes moved per second (read + write), median over `repeats` copies of `nbytes`."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of repeated measurements."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2]}


def load_state(cores: int | None = None) -> dict[str, Any]:
    """The 1-minute load average and whether it means a contended machine."""
    cores = cores or os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return {"load1": load, "cores": cores, "loaded": load > LOAD_FRACTION * cores}


@dataclass
class GenResult:
    prefill_s: float
    decode_s: float
    tokens: torch.Tensor  # [batch, gen_len] greedy tokens
    peak_cuda_bytes: int | None


def _forward(model: nn.Module, ids: torch.Tensor, cache: Any, pos: torch.Tensor) -> torch.Tensor:
    """One forward with the cache (positions continue from it); argmax of the last logits."""
    out = model(input_ids=ids, cache=cache, position_ids=pos.expand(ids.shape[0], -1), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def make_cache(model: nn.Module, kind: str, max_len: int) -> Any:
    from transformers import DynamicCache, StaticCache

    config: Any = model.config
    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    if kind == "dynamic":
        return DynamicCache(config=config)
    raise ValueError(f"cache must be 'static' or 'dynamic', got {kind!r}")


@torch.no_grad()
def prefill_and_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    gen_len: int,
    cache: str = "dynamic",
    step: Callable[..., torch.Tensor] | None = None,
) -> GenResult:
    """Greedy generation with a KV cache: one timed prefill, then gen_len - 1 timed decode steps.
    `step(model, ids, cache, positions) -> next ids` runs a decode step (e.g. a compiled one)."""
    device = input_ids.device
    step = step or _forward
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bs, plen = input_ids.shape
    kv = make_cache(model, cache, plen + gen_len)
    _sync(device)
    t0 = time.perf_counter()
    nxt = _forward(model, input_ids, kv, torch.arange(plen, device=device))
    _sync(device)
    t1 = time.perf_counter()
    toks = [nxt]
    for i in range(gen_len - 1):
        nxt = step(model, nxt, kv, torch.tensor([plen + i], device=device))
        toks.append(nxt)
    _sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return GenResult(t1 - t0, t2 - t1, torch.cat(toks, dim=1), peak)


def compiled_step(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The decode step of `model` through torch.compile (inductor; on a CPU it needs a C compiler).

    Two choices, measured side by side on SmolLM2 W4 + int8 head at batch 1, 2 idle threads (93
    tok/s before, 107 after; W4 with its bf16 head went from 64 to 121 between two benchmark runs,
    benchmarks/RESULTS.md): attention runs as plain matmul-softmax-matmul ("eager", set on the
    model), which inductor fuses, instead of torch's CPU flash kernel, which costs more than that
    for one query; and dynamo skips its guards on module attributes (thousands of checks per step).
    Without those guards a cached graph would serve any model, so dynamo's caches are reset first:
    one compiled model at a time, the last one compiled."""
    import torch._dynamo

    torch._dynamo.reset()
    set_attn: Any = getattr(model, "set_attn_implementation", None)
    if set_attn is not None:
        set_attn("eager")
    # dynamic=None: ints that change per step (cache length) go symbolic
    return torch.compile(_forward, options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})


def _speed(tokens: int, seconds: list[float], common: dict) -> dict[str, Any]:
    s = spread(seconds)
    return {
        "tokens_per_s": tokens / s["median"],
        "seconds": s["median"],
        "tokens": tokens,
        "tokens_per_s_min": tokens / s["max"],
        "tokens_per_s_max": tokens / s["min"],
        "tokens_per_s_q1": tokens / s["q3"],
        "tokens_per_s_q3": tokens / s["q1"],
        "runs_s": seconds,
        **common,
    }


def run_bench(
    model: nn.Module,
    *,
    batch_sizes: list[int] | None = None,
    prefill_batches: list[int] | None = None,
    decode_batches: list[int] | None = None,
    prompt_len: int = 512,
    decode_prompt_len: int | None = None,
    gen_len: int = 32,
    repeats: int = 1,
    quant_info: dict | None = None,
    path: str | None = None,
    seed: int = 0,
    cache: str = "static",
    compile: bool = False,
    copy_mib: int = 256,
    fake_quant: bool | None = None,
    vocab_size: int | None = None,
) -> tuple[dict[str, dict], list[str]]:
    """Metrics keyed like other quantshift metrics ("bench:decode@8": {...}) and notes for humans.
    `batch_sizes` sets both prefill and decode batch sizes; `fake_quant` defaults to "a
    quantized directory" (pass False for a packed model)."""
    if gen_len < 2:
        raise ValueError("gen_len must be at least 2 (one prefill token and one decode step)")
    prefill_batches = prefill_batches or batch_sizes or [1]
    decode_batches = decode_batches or batch_sizes or [1]
    decode_prompt_len = decode_prompt_len or prompt_len
    device = next(model.parameters()).device
    config: Any = model.config
    vocab = int(vocab_size or config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    fake = quant_info is not None if fake_quant is None else fake_quant
    metrics: dict[str, dict[str, Any]] = {}
    notes = []
    start = load_state()
    if start["loaded"]:
        notes.append(
            f"WARNING: load average {start['load1']:.2f} on {start['cores']} cores at start (> "
            f"{LOAD_FRACTION} x cores): other processes compete for the CPU; speeds are not the machine's"
        )
    if fake:
        notes.append(
            "quantized directory loaded as fake-quant (dequantized float weights): prefill/decode speed and "
            "memory are the float model's; packed_weight_bytes is what a packed export stores"
        )
    bw = copy_bandwidth(device, copy_mib << 20)
    warm = torch.randint(0, vocab, (1, min(prompt_len, 8)), generator=g).to(device)
    prefill_and_decode(model, warm, 2, cache)  # first-call allocations and kernel selection
    reps = max(1, repeats)
    common = {"fake_quant": fake, "repeats": reps, "cache": cache}
    for bs in prefill_batches:
        ids = torch.randint(0, vocab, (bs, prompt_len), generator=g).to(device)
        runs = [prefill_and_decode(model, ids, 2, "dynamic").prefill_s for _ in range(reps)]
        metrics[f"bench:prefill@{bs}"] = _speed(
            bs * prompt_len, runs, {"batch": bs, "prompt_len": prompt_len, **common}
        )
    read = decode_bytes_per_step(model)
    for bs in decode_batches:
        ids = torch.randint(0, vocab, (bs, decode_prompt_len), generator=g).to(device)
        step = None
        extra: dict[str, Any] = {}
        if compile:
            step = compiled_step(model)
            t0 = time.perf_counter()
            # compiles for this batch size and cache length: the timed runs then reuse the graph
            prefill_and_decode(model, ids, gen_len, "static", step)
            extra["compile_s"] = time.perf_counter() - t0
        res = [prefill_and_decode(model, ids, gen_len, "static" if compile else cache, step) for _ in range(reps)]
        steps = gen_len - 1
        m = _speed(
            bs * steps,
            [r.decode_s for r in res],
            {"batch": bs, "prompt_len": decode_prompt_len, "gen_len": gen_len, "compiled": compile, **common, **extra},
        )
        m["ms_per_step"] = 1000 * m["seconds"] / steps
        m["bound_tokens_per_s"] = bs * bw / read
        m["fraction_of_bound"] = m["tokens_per_s"] / m["bound_tokens_per_s"]
        if res[0].peak_cuda_bytes is not None:
            m["peak_cuda_bytes"] = max(r.peak_cuda_bytes or 0 for r in res)
        metrics[f"bench:decode@{bs}"] = m
    float_bytes = 2
    size: dict[str, Any] = {
        "param_bytes": param_bytes(model),
        "memory_bytes": memory_bytes(model),
        **packed_weight_bytes(model, quant_info, float_bytes),
        "float_bytes_per_param": float_bytes,
        "decode_bytes_per_step": read,
    }
    disk = dir_bytes(path)
    if disk is not None:
        size["disk_bytes"] = disk
    metrics["bench:size"] = size
    mem: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        mem["peak_cuda_bytes"] = max(m.get("peak_cuda_bytes", 0) for m in metrics.values())
    metrics["bench:memory"] = mem
    metrics["bench:bandwidth"] = {"copy_bytes_per_s": bw, "copy_bytes": copy_mib << 20}
    end = load_state()
    metrics["bench:load"] = {
        "start": start["load1"],
        "end": end["load1"],
        "cores": start["cores"],
        "loaded": start["loaded"],
        "threshold": LOAD_FRACTION * start["cores"],
    }
    return metrics, notes


def environment(device: torch.device | str) -> dict[str, Any]:
    import transformers

    env = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def measure_variant(model: str, variant: str, device: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Load `model` as `variant` and run the benchmark in this process."""
    from ..models.load import load_model

    backend, dtype = VARIANTS[variant]
    loaded = load_model(
        model, device=device, dtype=dtype, backend=backend, head="int8" if variant.endswith("-int8head") else "float"
    )
    dev = next(loaded.model.parameters()).device
    metrics, notes = run_bench(
        loaded.model,
        quant_info=loaded.quant_info,
        path=loaded.path,
        fake_quant=loaded.quant_info is not None and backend == "fake",
        **opts,
    )
    if loaded.packing is not None:
        notes = loaded.packing.lines() + notes
        metrics["bench:packing"] = loaded.packing.to_dict()
    return {
        "variant": variant,
        "backend": backend,
        "dtype": dtype,
        "metrics": metrics,
        "notes": notes,
        "environment": environment(dev),
    }


def study_bench(model_dir: str | Path, device: str) -> dict[str, Any]:
    """STUDY_BENCH of a kept quantized directory with its packed kernels (packed-bf16)."""
    res = measure_variant(str(model_dir), "packed-bf16", device, STUDY_BENCH)
    return {k: res[k] for k in ("variant", "metrics", "notes")}
