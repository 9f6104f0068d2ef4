"""Efficiency metrics of a model as loaded: size on disk, bytes of weights as a packed export
would store them, peak memory, prefill and decode throughput at several batch sizes.

A quantshift quantized directory loads as a fake-quant model (dequantized float weights), so
its speed is the float model's speed; the metrics say so (`fake_quant: true`) rather than
pretend otherwise. Packed-kernel speed is measured by benchmarks/decode_speed.py.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


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


def param_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenResult:
    prefill_s: float
    decode_s: float
    tokens: torch.Tensor  # [batch, gen_len] greedy tokens
    peak_cuda_bytes: int | None


@torch.no_grad()
def prefill_and_decode(model: nn.Module, input_ids: torch.Tensor, gen_len: int) -> GenResult:
    """Greedy generation with the KV cache: one timed prefill, then gen_len timed decode steps."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    past = out.past_key_values
    toks = [nxt]
    for _ in range(gen_len - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    _sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return GenResult(t1 - t0, t2 - t1, torch.cat(toks, dim=1), peak)


def run_bench(model: nn.Module, *, batch_sizes: list[int], prompt_len: int, gen_len: int, repeats: int = 1,
              quant_info: dict | None = None, path: str | None = None, seed: int = 0) -> tuple[dict[str, dict], list[str]]:
    """Metrics keyed like other quantshift metrics ("bench:decode@8": {...}) and notes for humans."""
    if gen_len < 2:
        raise ValueError("gen_len must be at least 2 (one prefill token and one decode step)")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    fake = quant_info is not None
    metrics: dict[str, dict[str, Any]] = {}
    notes = []
    if fake:
        notes.append("quantized directory loaded as fake-quant (dequantized float weights): prefill/decode speed and "
                     "memory are the float model's; packed_weight_bytes is what a packed export stores")
    warm = torch.randint(0, vocab, (1, min(prompt_len, 8)), generator=g).to(device)
    prefill_and_decode(model, warm, 2)  # first-call allocations and kernel selection
    for bs in batch_sizes:
        ids = torch.randint(0, vocab, (bs, prompt_len), generator=g).to(device)
        runs = [prefill_and_decode(model, ids, gen_len) for _ in range(max(1, repeats))]
        pre = min(r.prefill_s for r in runs)
        dec = min(r.decode_s for r in runs)
        common = {"batch": bs, "prompt_len": prompt_len, "gen_len": gen_len, "repeats": len(runs), "fake_quant": fake}
        metrics[f"bench:prefill@{bs}"] = {"tokens_per_s": bs * prompt_len / pre, "seconds": pre,
                                          "tokens": bs * prompt_len, **common}
        metrics[f"bench:decode@{bs}"] = {"tokens_per_s": bs * (gen_len - 1) / dec, "seconds": dec,
                                         "tokens": bs * (gen_len - 1), "ms_per_step": 1000 * dec / (gen_len - 1), **common}
        if runs[0].peak_cuda_bytes is not None:
            metrics[f"bench:decode@{bs}"]["peak_cuda_bytes"] = max(r.peak_cuda_bytes or 0 for r in runs)
    float_bytes = 2
    size = {"param_bytes": param_bytes(model), **packed_weight_bytes(model, quant_info, float_bytes),
            "float_bytes_per_param": float_bytes}
    disk = dir_bytes(path)
    if disk is not None:
        size["disk_bytes"] = disk
    metrics["bench:size"] = size
    mem: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        mem["peak_cuda_bytes"] = max(m.get("peak_cuda_bytes", 0) for m in metrics.values())
    metrics["bench:memory"] = mem
    return metrics, notes


def environment(device: torch.device | str) -> dict[str, Any]:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
