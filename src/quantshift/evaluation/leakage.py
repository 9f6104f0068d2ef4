"""Leakage guard: scored items must not appear among few-shot exemplars or calibration text.

Checked by item id and by long word n-gram overlap (13-grams, the GPT-3 decontamination
length): templated datasets repeat passages under different ids, which an id check misses.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import DataError

NGRAM = 13
_WORD = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def _tokens(text: str) -> list[str]:
    # CJK text has no spaces: count each character as a word so n-grams still mean something
    out: list[str] = []
    for w in _WORD.findall(text.lower()):
        if _CJK.search(w):
            out.extend(w)
        else:
            out.append(w)
    return out


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    t = _tokens(text)
    return {hash(tuple(t[i : i + n])) for i in range(len(t) - n + 1)}


@dataclass
class Overlap:
    scored_id: str
    other_id: str
    kind: str  # "id" or f"{n}-gram"
    snippet: str

    def __str__(self) -> str:
        return f"{self.scored_id} ~ {self.other_id} ({self.kind}: {self.snippet!r})"


def template_ngrams(texts: list[str], n: int = NGRAM, frac: float = 0.02, at_least: int = 5) -> set[int]:
    """n-grams shared by many scored items: a dataset's own prompt template, not leaked content.

    (Templated tasks repeat sentences such as "What is the date today in MM/DD/YYYY?" in every
    item; counting those would flag every exemplar. With a cut of 10 items, BIG-bench's
    date_understanding still chained 336 of its 369 items into one split unit through sentences
    repeated in 5-9 items, leaving 9 items to score; 5 breaks it into units of at most 81.)
    """
    from collections import Counter

    counts = Counter(g for t in texts for g in ngrams(t, n))
    cut = max(at_least, int(frac * len(texts)))
    return {g for g, c in counts.items() if c >= cut}


def find_overlaps(
    scored: Iterable[tuple[str, str]],
    others: Iterable[tuple[str, str]],
    n: int = NGRAM,
    max_report: int = 20,
    population: list[str] | None = None,
) -> list[Overlap]:
    """Pairs (scored item, other item) sharing an id or a word n-gram; inputs are (id, text).

    n-grams common to many items of `population` (default: the scored texts) are the dataset's
    template and not counted.
    """
    scored = list(scored)
    common = template_ngrams(population if population is not None else [t for _i, t in scored], n)
    index: dict[int, str] = {}
    ids: set[str] = set()
    for oid, text in others:
        ids.add(oid)
        for g in ngrams(text, n) - common:
            index.setdefault(g, oid)
    found: list[Overlap] = []
    for sid, text in scored:
        if sid in ids:
            found.append(Overlap(sid, sid, "id", ""))
        else:
            t = _tokens(text)
            for i in range(len(t) - n + 1):
                hit = index.get(hash(tuple(t[i : i + n])))
                if hit is not None:
                    found.append(Overlap(sid, hit, f"{n}-gram", " ".join(t[i : i + n])))
                    break
        if len(found) >= max_report:
            break
    return found


def check_leakage(
    scored: Iterable[tuple[str, str]],
    others: Iterable[tuple[str, str]],
    what: str,
    n: int = NGRAM,
    strict: bool = True,
    population: list[str] | None = None,
) -> list[Overlap]:
    """Raise DataError (strict) or warn, naming the overlapping items, when scored items leak into `what`."""
    found = find_overlaps(scored, others, n, population=population)
    if found:
        msg = f"leakage: {len(found)}{'+' if len(found) >= 20 else ''} scored item(s) overlap {what}: " + "; ".join(
            str(o) for o in found[:3]
        )
        if strict:
            raise DataError(msg)
        warnings.warn(msg, stacklevel=2)
    return found


def drop_overlapping(
    pool: list[dict], scored: list[dict], text_key: Callable[[dict], str] = lambda d: d["text"], n: int = NGRAM
) -> tuple[list[dict], int]:
    """Pool items that share no id and no n-gram with any scored item, and how many were dropped."""
    bad: set[int] = set()
    ids = {d["id"] for d in scored}
    texts = [text_key(d) for d in scored]
    for t in texts:
        bad |= ngrams(t, n)
    bad -= template_ngrams(texts, n)
    kept = [d for d in pool if d["id"] not in ids and not (ngrams(text_key(d), n) & bad)]
    return kept, len(pool) - len(kept)
