"""Decode speed at batch 1: float weights vs packed W4 g128, next to the memory-bandwidth bound.

Decoding one token reads every weight once, so tokens/s <= bandwidth / bytes of weights read
per token. The bandwidth is measured in the same run with a large device-to-device copy
(bytes read + bytes written per second), and each variant's bound is printed beside its
measured speed.

Model: transformers LlamaForCausalLM from a config with random weights (speed does not depend
on the values). Default shapes are Llama-2-7B's; `--small` uses hidden 1024 / mlp 2816 (a multiple of 128) /
8 heads / 4 layers so it runs on a CPU in about a minute.
W4: every decoder linear quantized RTN 4-bit asymmetric g128 and replaced by
quantshift.quant.qlinear.PackedLinear (int4 tinygemm kernel: aten._weight_int4pack_mm on CUDA,
its CPU variant on CPU); lm_head and embeddings stay float.

    python benchmarks/decode_speed.py            # GPU, Llama-2-7B shapes
    nice -n 10 python benchmarks/decode_speed.py --small --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

import torch


def llama_config(small: bool, layers: int | None, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # a smoke test of the same code path (gpu_session.sh --dry-run), not a measurement
        cfg = dict(
            hidden_size=128,
            intermediate_size=384,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=1,
            vocab_size=2048,
        )
    elif small:
        cfg = dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_attention_heads=8,
            num_key_value_heads=8,
            num_hidden_layers=4,
            vocab_size=32000,
        )
    else:  # Llama-2-7B
        cfg = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            num_hidden_layers=32,
            vocab_size=32000,
        )
    if layers:
        cfg["num_hidden_layers"] = layers
    return LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes moved per second (read + write) by a device copy of `nbytes`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Parameters and buffers a decode step reads: all but the embedding table (one row)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or "embed_tokens" in name or "rotary" in name:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def build(config, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def quantize_w4(model, group_size: int, backend: str) -> dict[str, str]:
    from quantshift.quant.primitives import QuantSpec, quantize_weight
    from quantshift.quant.qlinear import pack_model

    spec = QuantSpec(bits=4, group_size=group_size, symmetric=False)
    chosen = {}
    for i, layer in enumerate(model.model.layers):
        names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        weights = {n: quantize_weight(layer.get_submodule(n).weight.detach(), spec) for n in names}
        chosen.update(
            {
                f"layers.{i}.{k}": v
                for k, v in pack_model(layer, weights, backend, next(model.parameters()).dtype).items()
            }
        )
        gc.collect()
    return chosen


def decode_tok_s(model, device: torch.device, prompt: int, steps: int, repeats: int) -> float:
    from quantshift.bench.measure import prefill_and_decode

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    prefill_and_decode(model, ids[:, :8], 3)  # warm-up
    best = min(prefill_and_decode(model, ids, steps + 1).decode_s for _ in range(repeats))
    return steps / best


def versions(device: torch.device) -> str:
    import transformers

    from quantshift.quant.qlinear import torchao_version

    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return (
        f"device: {dev}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"torchao {torchao_version() or 'not installed'}; python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="hidden 1024 / mlp 2816 / 8 heads / 4 layers")
    ap.add_argument(
        "--tiny", action="store_true", help="hidden 128 / mlp 384, 1 layer: a smoke test, not a measurement"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float dtype (default float16 on CUDA, float32 on CPU)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--copy-mib", type=int, default=None, help="bytes for the bandwidth copy (default 1024 GPU / 256 CPU)"
    )
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    config = llama_config(args.small, args.layers, args.tiny)
    print(versions(device))
    shape = f"hidden {config.hidden_size}, mlp {config.intermediate_size}, {config.num_attention_heads} heads, {config.num_hidden_layers} layers, vocab {config.vocab_size}"
    size = "tiny" if args.tiny else ("small" if args.small else "Llama-2-7B")
    print(
        f"model: LlamaForCausalLM random weights ({size} shapes: {shape}); batch 1, "
        f"prompt {args.prompt}, {args.steps} decode steps, best of {args.repeats}"
    )
    copy = (args.copy_mib or (1024 if device.type == "cuda" else 256)) * 2**20
    bw = copy_bandwidth(device, copy)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read+write, {copy >> 20} MiB device copy)")

    rows = []
    model = build(config, dtype, device)
    fp_bytes = bytes_read_per_token(model)
    fp_tok = decode_tok_s(model, device, args.prompt, args.steps, args.repeats)
    rows.append({"variant": str(dtype).replace("torch.", ""), "bytes_per_token": fp_bytes, "tok_s": fp_tok})
    backend = "int4mm-cuda" if device.type == "cuda" else "int4mm-cpu"
    act_dtype = dtype
    if backend == "int4mm-cuda" and dtype != torch.bfloat16:
        act_dtype = torch.bfloat16  # the CUDA int4 kernel is bfloat16-only: same bytes, no per-layer casts
        model.to(act_dtype)
    chosen = quantize_w4(model, args.group_size, backend)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    w4_bytes = bytes_read_per_token(model)
    w4_tok = decode_tok_s(model, device, args.prompt, args.steps, args.repeats)
    rows.append(
        {
            "variant": f"W4 g{args.group_size} ({backend}, {str(act_dtype).replace('torch.', '')})",
            "bytes_per_token": w4_bytes,
            "tok_s": w4_tok,
            "packed_linears": len(chosen),
        }
    )

    print(
        f"{'variant':36s} {'GB read/token':>13s} {'bound tok/s':>11s} {'measured':>9s} {'measured/bound':>14s} {'vs float':>8s}"
    )
    for r in rows:
        r["bound_tok_s"] = bw / r["bytes_per_token"]
        r["fraction_of_bound"] = r["tok_s"] / r["bound_tok_s"]
        r["speedup_vs_float"] = r["tok_s"] / rows[0]["tok_s"]
        print(
            f"{r['variant']:36s} {r['bytes_per_token'] / 1e9:13.3f} {r['bound_tok_s']:11.1f} {r['tok_s']:9.1f} "
            f"{r['fraction_of_bound']:14.2f} {r['speedup_vs_float']:7.2f}x"
        )
    result = {
        "versions": versions(device),
        "shape": shape,
        "copy_bandwidth_bytes_s": bw,
        "rows": rows,
        "args": vars(args),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
