"""The real low-bit kernels against the fake-quant modules they replace: error and speed.

For each kernel quantshift's packed backend runs (quant.inference), on Llama-2-7B linear shapes
(4096 x 4096, 11008 x 4096, 4096 x 11008) and M = 1 (decoding), 16, 128, 2048 rows:
- int4 W4A16 g128: PackedLinear ("int4mm-cuda", torch's tinygemm kernel, sm80+), against
  F.linear of the dequantized weight in float32 (the fake-quant model's arithmetic);
- int8 W8A8 (per-channel weights, per-token inputs): Int8Linear ("int8-intmm", torch._int_mm,
  sm75+), against the fake input quantizer + F.linear of the dequantized weight in float32;
- fp8 E4M3 W8A8: FP8Linear ("fp8-scaled-mm", torch._scaled_mm, sm89+), against the same;
each with the kernel `auto` picks on this device (models.capability) and why, the maximum error
relative to the reference's largest output, and the median time per call next to a bf16 (CPU:
float32) F.linear of the dense dequantized weight, which is what the fake-quant model runs.

    python benchmarks/gpu_kernels.py --json out.json          # CUDA, 7B shapes
    python benchmarks/gpu_kernels.py --small --device cpu     # the same checks, small, on a CPU
On a CPU the fp8 row runs torch's CPU _scaled_mm by name (auto keeps the fake-quant there): the
arithmetic is checked, its speed means nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    runs = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            runs.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> dict:
    from quantshift.models import capability
    from quantshift.quant.actquant import InputQuantizer
    from quantshift.quant.fp8linear import FP8_GEMM_TOLERANCE, FP8Linear, fp8_choice
    from quantshift.quant.int8linear import Int8Linear, int8_choice
    from quantshift.quant.primitives import QuantSpec, quantize_weight
    from quantshift.quant.qlinear import PackedLinear, int4_choice

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="256 x 512 and 512 x 256, M = 1 and 8 (a CPU check)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 50 GPU / 3 CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cap = capability.detect(device)
    shapes = [(256, 512), (512, 256)] if args.small else [(4096, 4096), (11008, 4096), (4096, 11008)]
    rows_m = [1, 8] if args.small else [1, 16, 128, 2048]
    iters = args.iters or (50 if device.type == "cuda" else 3)
    dense_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print("\n".join(cap.lines()))
    a8 = {"spec": QuantSpec(bits=8, group_size=0, symmetric=True).model_dump(), "per_token": True}
    f8 = {"spec": QuantSpec(bits=8, group_size=0, symmetric=True, dtype="fp8").model_dump(), "per_token": True}
    out = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for out_f, in_f in shapes:
        w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device)
        q4 = quantize_weight(w, QuantSpec(bits=4, group_size=128, symmetric=False))
        q8 = quantize_weight(w, QuantSpec(bits=8, group_size=-1, symmetric=True))
        qf = quantize_weight(w, QuantSpec(bits=8, group_size=-1, symmetric=True, dtype="fp8"))
        cases = [
            ("int4 w4a16 g128", int4_choice(q4, cap), PackedLinear(q4, None, "auto", device), q4, None),
            ("int8 w8a8", int8_choice(out_f, in_f, cap), Int8Linear(q8, a8, device=device), q8, a8),
        ]
        cf = fp8_choice(qf, f8, cap)
        if cf.reason is None or device.type == "cpu":  # on a CPU: the arithmetic, by name (auto keeps the fake-quant)
            kernel = "auto" if cf.reason is None else "fp8-scaled-mm"
            cases.append(("fp8 w8a8", cf, FP8Linear(qf, f8, None, kernel, device), qf, f8))
        else:
            out.append(
                {
                    "kernel": "fp8 w8a8",
                    "shape": [out_f, in_f],
                    "auto": cf.kernel,
                    "reason": cf.reason,
                    "skipped": "no fp8 GEMM on this device",
                }
            )
        for name, choice, module, qw, act in cases:
            ran = getattr(module, "kernel", getattr(module, "backend", "?"))
            dense = qw.dequantize().to(device)
            dense_lp = dense.to(dense_dtype)
            quant_in = InputQuantizer(QuantSpec(**act["spec"]), True) if act else None
            for m in rows_m:
                x = torch.randn(m, in_f, generator=gen).to(device)
                xin = quant_in(None, (x,))[0] if quant_in else x
                ref = torch.nn.functional.linear(xin.float(), dense.float())
                with torch.no_grad():
                    err = rel(module(x), ref)
                    t_kernel = timed(lambda module=module, x=x: module(x), device, iters)
                    xd = xin.to(dense_dtype)
                    t_dense = timed(lambda xd=xd, w=dense_lp: torch.nn.functional.linear(xd, w), device, iters)
                row = {
                    "kernel": name,
                    "ran": ran,
                    "auto": choice.kernel,
                    "reason": choice.reason,
                    "shape": [out_f, in_f],
                    "M": m,
                    "rel_err": err,
                    "ms": t_kernel * 1e3,
                    "dense_ms": t_dense * 1e3,
                    "speedup_vs_dense": t_dense / t_kernel,
                    "dense_dtype": str(dense_dtype).replace("torch.", ""),
                }
                out.append(row)
                print(
                    f"{name:16s} {ran:14s} {out_f:5d}x{in_f:<5d} M={m:<5d} rel err {err:.2e}  {t_kernel * 1e3:8.3f} ms"
                    f"  dense {row['dense_ms']:8.3f} ms  {row['speedup_vs_dense']:5.2f}x"
                    + (f"  (auto: {choice.kernel}, {choice.reason})" if choice.reason else "")
                )
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # bf16 kernel; exact integer products and sums; exact fp8 products, sums as the tensor cores keep them
    tol = {"int4 w4a16 g128": 2e-2, "int8 w8a8": 1e-4, "fp8 w8a8": FP8_GEMM_TOLERANCE}
    bad = [r for r in out if "rel_err" in r and r["rel_err"] > tol[r["kernel"]]]
    result = {
        "device": cap.label,
        "capability": cap.lines(),
        "rows": out,
        "tolerance": tol,
        "all_within_tolerance": not bad,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if bad:
        print(f"{len(bad)} measurements outside tolerance: {[(r['kernel'], r['shape'], r['M']) for r in bad]}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["all_within_tolerance"] else 1)
