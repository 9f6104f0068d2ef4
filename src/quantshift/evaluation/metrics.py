"""Generation metrics (SQuAD-style): exact match and token F1 against any gold answer."""

from __future__ import annotations

import re
import string
from collections import Counter


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: list[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def f1(pred: str, golds: list[str]) -> float:
    best = 0.0
    pt = normalize_answer(pred).split()
    for g in golds:
        gt = normalize_answer(g).split()
        common = Counter(pt) & Counter(gt)
        same = sum(common.values())
        if not pt or not gt:
            best = max(best, float(pt == gt))
        elif same:
            prec, rec = same / len(pt), same / len(gt)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def process_results(doc: dict, results: list) -> dict:
    """lm-eval hook for our generation tasks: results[0] is the greedy completion."""
    pred = str(results[0]).strip()
    golds = [str(a) for a in doc.get("answers", [])]
    return {"exact_match": exact_match(pred, golds), "f1": f1(pred, golds)}
