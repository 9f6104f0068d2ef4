"""One Markdown table from several `quantshift eval --json` files: tasks as rows, models as columns.

    python benchmarks/suite_table.py fp=fp.json gptq-w4=w4.json gptq-w3=w3.json --metric acc > table.md

Each cell is the accuracy in % with its 95% bootstrap interval; the last rows are the mean over
the tasks every model has, and each model's paired difference from the first one over the very
same items (bootstrap interval, sign-flip p-value; from the samples files beside the JSONs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="label=path/to/eval.json")
    ap.add_argument("--metric", default="acc")
    args = ap.parse_args()
    runs, items = {}, {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        doc = json.loads(Path(path).read_text())
        runs[label] = doc["metrics"]
        lines = (Path(path).parent / doc["samples_file"]).read_text().splitlines()
        items[label] = {(r["key"], r["id"]): r.get(args.metric) for r in map(json.loads, lines)}
    keys = [k for k in next(iter(runs.values())) if k.startswith("task:")]
    common = [k for k in keys if all(k in m and isinstance(m[k].get(args.metric), float) for m in runs.values())]
    print("| task | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for k in keys:
        cells = []
        for m in runs.values():
            r = m.get(k, {})
            v, ci = r.get(args.metric), r.get(f"{args.metric}_ci")
            cells.append(
                "–"
                if v is None
                else f"{100 * v:.1f} [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
                if ci
                else f"{100 * v:.1f}"
            )
        n = next(iter(runs.values())).get(k, {}).get("n")
        print(f"| {k[5:]} (n={n}) | " + " | ".join(cells) + " |")
    means = [sum(m[k][args.metric] for k in common) / len(common) for m in runs.values()]
    n_items = sum(next(iter(runs.values()))[k]["n"] for k in common)
    print(
        f"| **mean of {len(common)} tasks** ({n_items} items) | "
        + " | ".join(f"**{100 * v:.1f}**" for v in means)
        + " |"
    )
    from quantshift.evaluation.stats import paired_bootstrap

    labels = list(runs)
    base = items[labels[0]]
    row = ["—"]
    for label in labels[1:]:
        ids = [
            i
            for i in base
            if i[0] in common and isinstance(base[i], (int, float)) and isinstance(items[label].get(i), (int, float))
        ]
        r = paired_bootstrap([base[i] for i in ids], [items[label][i] for i in ids])
        row.append(f"{100 * r.diff:+.1f} [{100 * r.ci[0]:+.1f}, {100 * r.ci[1]:+.1f}], p={r.p_value:.3f}")
    print(f"| paired Δ vs {labels[0]} (same items, points) | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
