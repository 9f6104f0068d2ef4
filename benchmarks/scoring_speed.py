"""Task scoring speed: lm-eval's own HF scorer against quantshift's (vocabulary projection only at
scored positions, evaluation/harness.py), side by side in one run, same items, same accuracies.

    python benchmarks/scoring_speed.py                          # gemma3-270m, 3 tasks x 40 items
    python benchmarks/scoring_speed.py --model smollm2-135m --limit 20
"""

from __future__ import annotations

import argparse
import os
import time

import quantshift
from quantshift.evaluation import harness


def lm_eval_scorer(loaded, batch_size):
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=batch_size,
        device=str(next(loaded.model.parameters()).device),
        add_bos_token=True if loaded.needs_bos else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tasks", default="bb_bbq_lite,mmlu_dev,bb_logical_deduction")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ours = harness.make_lm
    print(
        f"{args.model}, tasks {args.tasks}, {args.limit} items each; load average at start "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    times: dict[str, list[float]] = {"lm-eval": [], "quantshift": []}
    for _ in range(args.repeats):
        for name, make in (("lm-eval", lm_eval_scorer), ("quantshift", ours)):
            harness.make_lm = make
            t0 = time.perf_counter()
            r = quantshift.evaluate(args.model, tasks=args.tasks, limit=args.limit, batch_size=8, progress=False)
            times[name].append(time.perf_counter() - t0)
            accs = ", ".join(f"{k} {v['acc']:.4f}" for k, v in r.items())
            print(f"  {name:10s} {times[name][-1]:6.1f} s  {accs}", flush=True)
    harness.make_lm = ours
    best = {k: min(v) for k, v in times.items()}
    print(
        f"best of {args.repeats} (load, model and task setup included): lm-eval {best['lm-eval']:.1f} s, "
        f"quantshift {best['quantshift']:.1f} s, ratio {best['lm-eval'] / best['quantshift']:.2f}x; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
