"""Quantization cost: seconds per decoder layer and peak memory for GPTQ, AWQ and RTN.

Runs quantshift's real pipeline (quantshift.quantize.quantize_model -> BlockEngine) on a
transformers LlamaForCausalLM built from a config with random weights. Seconds per layer are
the engine's own per-block timings (statistics, solve, and propagating the calibration batch
through the quantized block); the one-off capture of first-block inputs is reported apart.
Each method runs in its own subprocess so that peak memory (CUDA max allocated, or the
process's peak RSS on CPU) belongs to that method alone.

`gptq-textbook` is the baseline our GPTQ is compared with in the same run: the paper's
Algorithm 1 written plainly, the way the widely used tools run it (one float32 Hessian and one column
loop per linear, the inverse by Cholesky -> inverse -> Cholesky, columns of W updated in place).
Our `gptq` gets the same result (tests/test_gptq.py checks this) with one Hessian and one column
loop per group of linears sharing an input, a single triangular inverse, and a loop over rows of
W^T. The last lines print both ratios: time, and mean block output error.

Default: Llama-2-7B layer shapes (hidden 4096, mlp 11008, 32 heads), 4 layers, 128 x 2048
calibration tokens, on CUDA. `--small`: hidden 1024, mlp 2752, 8 heads, 2 layers, 16 x 512
tokens, for a CPU.

    python benchmarks/quantize_speed.py
    nice -n 10 python benchmarks/quantize_speed.py --small --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

RECIPES = {
    "rtn": {"rtn": {"wbits": 4, "group_size": 128}},
    # the paper's column order, as the textbook baseline below (our default is act-order)
    "gptq": {"gptq": {"wbits": 4, "group_size": 128, "act_order": False, "static_groups": False}},
    "awq": {"awq": {"wbits": 4, "group_size": 128}},
    "gptq-textbook": {"gptq-textbook": {"wbits": 4, "group_size": 128}},
}


def gptq_textbook_solve(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, damp: float = 0.01, block_size: int = 128
) -> torch.Tensor:
    """GPTQ as Algorithm 1 of the paper states it (asymmetric min/max grid, groups in column order)."""
    W, H = W.clone().float(), H.clone().float()
    n = W.shape[1]
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:  # group params from the columns as updated so far
                g = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                lo, hi = g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)
                scale = (hi - lo) / maxq
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                zero = torch.round(-lo / scale)
            w, d = W1[:, i], Hinv1[i, i]
            q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def register_textbook() -> None:
    """Register `gptq-textbook` (in this process only): its own float32 Hessian per linear, no stacking."""
    from quantshift.methods import METHODS
    from quantshift.methods.base import SolveResult, register
    from quantshift.methods.gptq import GPTQ, accumulate_hessian, hessian_error

    if "gptq-textbook" in METHODS:
        return

    @register("gptq-textbook")
    class GPTQTextbook(GPTQ):
        def add_batch(self, stats, x):  # upcast first, a float32 GEMM, as those tools do
            accumulate_hessian(stats, x.float())

        def _collect_stats(self, ctx, names):
            stats = {n: self.new_stats(ctx.linear(n)) for n in names}
            ctx.collect_inputs(names, lambda name, x: self.add_batch(stats[name], x))
            return stats

        def solve(self, name, linear, stats, plan):
            W = linear.weight.detach().float()
            Q = gptq_textbook_solve(
                W, stats.H, plan.weight.bits, plan.weight.group_size, self.config.damp, self.config.block_size
            )
            return SolveResult(Q, None, {"out_rel_err": hessian_error(W, Q, stats.H)})


def config(small: bool, layers: int | None, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # a smoke test of the same code path (gpu_session.sh --dry-run), not a measurement
        cfg = dict(
            hidden_size=128,
            intermediate_size=352,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=1,
            vocab_size=2048,
        )
    elif small:
        cfg = dict(
            hidden_size=1024,
            intermediate_size=2752,
            num_attention_heads=8,
            num_key_value_heads=8,
            num_hidden_layers=2,
            vocab_size=32000,
        )
    else:
        cfg = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            num_hidden_layers=4,
            vocab_size=32000,
        )
    if layers:
        cfg["num_hidden_layers"] = layers
    return LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False)


def run_one(method: str, args) -> dict:
    from transformers import LlamaForCausalLM

    from quantshift.data.calibset import CalibManifest, CalibSet, ids_sha256
    from quantshift.methods import METHODS
    from quantshift.models.arch import arch_for
    from quantshift.models.load import LoadedModel
    from quantshift.pipeline import quantize_model
    from quantshift.recipes import recipe_from_dict

    if method == "gptq-textbook":
        register_textbook()
    if method not in METHODS:
        return {"method": method, "skipped": "not registered"}
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(config(args.small, args.layers, args.tiny)).to(dtype).eval()
    )  # blocks stay on CPU, one at a time on device
    ids = torch.randint(
        0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    calib = CalibSet(
        ids, CalibManifest("random", "calib", 0, args.nsamples, args.seqlen, ids.numel(), "none", ids_sha256(ids))
    )
    loaded = LoadedModel(model, None, "random-llama", "memory", arch_for(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = quantize_model(
        loaded,
        recipe_from_dict({"stages": [RECIPES[method]]}),
        calib,
        device=str(device),
        batch_size=args.batch_size,
        progress=False,
    )
    total = time.perf_counter() - t0
    per_layer = [b["seconds"] for b in res.engine.blocks]
    block_errs = [b["out_rel_err"] for b in res.engine.blocks if "out_rel_err" in b]  # none without calibration
    linear_errs = [m.info["out_rel_err"] for m in res.engine.modules.values() if "out_rel_err" in m.info]
    out = {
        "method": method,
        "layers": len(per_layer),
        "seconds_per_layer": sum(per_layer) / len(per_layer),
        "block_out_rel_err": sum(block_errs) / len(block_errs) if block_errs else None,
        "per_layer_out_rel_err": block_errs,
        "linear_out_rel_err": sum(linear_errs) / len(linear_errs) if linear_errs else None,
        "per_layer": per_layer,
        "seconds_total": total,
        "seconds_outside_layers": total - sum(per_layer),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def versions(device: str) -> str:
    import transformers

    dev = (
        torch.cuda.get_device_name(torch.device(device))
        if device.startswith("cuda")
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return f"device: {dev}; torch {torch.__version__}; transformers {transformers.__version__}; python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--small", action="store_true", help="CPU shapes: hidden 1024 / mlp 2752 / 8 heads, 16 x 512 tokens"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="hidden 128 / mlp 352, 1 layer: a smoke test, not a measurement"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="gptq,gptq-textbook,awq,rtn")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=None, help="calibration sequences (128; 16 with --small)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (2048; 512 with --small)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child process: one method, JSON on stdout
    args = ap.parse_args(argv)
    args.nsamples = args.nsamples or (16 if args.small else 128)
    args.seqlen = args.seqlen or (512 if args.small else 2048)

    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)))
        return 0

    cfg = config(args.small, args.layers, args.tiny)
    print(versions(args.device))
    print(
        f"model: LlamaForCausalLM random weights, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
        f"{cfg.num_attention_heads} heads, {cfg.num_hidden_layers} layers; calibration {args.nsamples} x {args.seqlen} "
        f"tokens, batch {args.batch_size}; W4 g128 asym"
    )
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cmd = [
            sys.executable,
            __file__,
            "--only",
            method,
            "--device",
            args.device,
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--batch-size",
            str(args.batch_size),
        ]
        cmd += ["--small"] if args.small else []
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--layers", str(args.layers)] if args.layers else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            rows.append({"method": method, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(line[len("RESULT ") :]))
    # block error: |block_q(x) - block_fp(x)|^2 / |block_fp(x)|^2 on the calibration batch,
    # averaged over layers; linear error: GPTQ's tr(dW H dW^T) / tr(W H W^T), averaged over linears
    print(
        f"{'method':13s} {'s/layer':>9s} {'capture+other s':>15s} {'block err':>10s} {'linear err':>10s} "
        f"{'peak RSS MiB':>12s} {'peak CUDA MiB':>13s}"
    )
    for r in rows:
        if "seconds_per_layer" not in r:
            print(f"{r['method']:13s} {r.get('skipped') or 'error: ' + r.get('error', '')}")
            continue
        cuda = f"{r['peak_cuda_bytes'] / 2**20:13.0f}" if "peak_cuda_bytes" in r else f"{'-':>13s}"
        blk, lin = (
            f"{r[k]:10.3e}" if r.get(k) is not None else f"{'-':>10s}"
            for k in ("block_out_rel_err", "linear_out_rel_err")
        )
        print(
            f"{r['method']:13s} {r['seconds_per_layer']:9.2f} {r['seconds_outside_layers']:15.2f} "
            f"{blk} {lin} {r['peak_rss_bytes'] / 2**20:12.0f} {cuda}"
        )
    by = {r["method"]: r for r in rows if "seconds_per_layer" in r}
    if "gptq" in by and "gptq-textbook" in by:
        ours, plain = by["gptq"], by["gptq-textbook"]
        print(
            f"gptq vs gptq-textbook: {plain['seconds_per_layer'] / ours['seconds_per_layer']:.2f}x faster per layer, "
            f"block error ratio {ours['block_out_rel_err'] / plain['block_out_rel_err']:.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(args.device), "args": vars(args), "rows": rows}, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
