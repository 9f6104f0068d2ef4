"""An offline instruction-following task in the manner of IFEval (Zhou et al. 2023, arXiv
2311.07911): prompts whose instructions a program can verify (a keyword, a length, letter case, a
format), checked by code after greedy generation.

IFEval's own 541 prompts live on the Hugging Face hub and in no installable package, and lm-eval's
checkers import langdetect and fetch NLTK data at run time, so neither works offline. This task
is quantshift's own: 320 prompts built from templates below (a writing request on a topic, plus
one or two instructions from 16 kinds that IFEval also has, never two that contradict), each
instruction checked by a small pure function here. Scores: `acc`, every instruction of a prompt
followed (IFEval's prompt-level strict accuracy), and `inst_acc`, the share of instructions
followed (instruction-level). The set is deterministic (seeded per prompt).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

N_PROMPTS = 320
TOPICS = [
    "the ocean",
    "a city park",
    "winter mornings",
    "bicycles",
    "an old library",
    "bread baking",
    "honey bees",
    "the moon",
    "rainy days",
    "a train journey",
    "learning a language",
    "mountains",
    "a small bakery",
    "desert plants",
    "a lighthouse",
    "coffee",
    "the night sky",
    "a school garden",
    "recycling",
    "chess",
    "a river",
    "autumn leaves",
    "a museum visit",
    "owls",
    "public libraries",
    "a market street",
    "volcanoes",
    "kites",
    "a quiet village",
    "tea",
    "the first snow",
    "an old clock",
    "sailing",
    "a forest path",
    "street music",
    "pottery",
    "a bridge",
    "penguins",
    "a summer festival",
    "maps",
]
FORMS = [
    "a short paragraph",
    "a short story",
    "a short poem",
    "a product description",
    "a short letter to a friend",
    "a short explanation for a child",
    "a short news report",
    "a few tips",
]
WORDS = ["light", "green", "journey", "quiet", "simple", "bright", "morning", "friend", "history", "water"]
END_PHRASES = ["Is there anything else I can help with?", "That is all.", "Thank you for reading."]
START_WORDS = ["Yes", "Today", "Imagine"]


@dataclass(frozen=True)
class Kind:
    """One kind of verifiable instruction: its text, its check, and the parts of an answer it
    constrains (two instructions of a prompt never share a part, so they cannot contradict; a
    fixed phrase with capitals constrains the case too)."""

    text: Callable[[dict], str]
    check: Callable[[str, dict], bool]
    parts: frozenset[str]
    params: Callable[[random.Random, str], dict] = lambda rng, topic: {}


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _strip_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = re.sub(r"^```[A-Za-z]*\s*", "", t)
        t = re.sub(r"\s*```$", "", t)
    return t


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fence(text))
    except ValueError:
        return False
    return True


def _topic_noun(topic: str) -> str:
    return topic.split()[-1]


KINDS: dict[str, Kind] = {
    "include_word": Kind(
        lambda p: f'Include the word "{p["word"]}" in your answer.',
        lambda r, p: p["word"].lower() in (w.lower() for w in _words(r)),
        frozenset({"include"}),
        lambda rng, topic: {"word": rng.choice(WORDS)},
    ),
    "exclude_word": Kind(
        lambda p: f'Do not use the word "{p["word"]}" anywhere in your answer.',
        lambda r, p: p["word"].lower() not in (w.lower() for w in _words(r)),
        frozenset({"exclude"}),
        lambda rng, topic: {"word": _topic_noun(topic)},
    ),
    "lowercase": Kind(
        lambda p: "Your entire answer must be in lowercase letters; no capital letters at all.",
        lambda r, p: r == r.lower() and any(c.isalpha() for c in r),
        frozenset({"case"}),
    ),
    "uppercase": Kind(
        lambda p: "Your entire answer must be in English capital letters only.",
        lambda r, p: r == r.upper() and any(c.isalpha() for c in r),
        frozenset({"case"}),
    ),
    "max_words": Kind(
        lambda p: f"Answer in fewer than {p['n']} words.",
        lambda r, p: 0 < len(_words(r)) < p["n"],
        frozenset({"length"}),
        lambda rng, topic: {"n": rng.choice([20, 30, 50])},
    ),
    "min_words": Kind(
        lambda p: f"Answer in at least {p['n']} words.",
        lambda r, p: len(_words(r)) >= p["n"],
        frozenset({"length"}),
        lambda rng, topic: {"n": rng.choice([40, 60, 80])},
    ),
    "end_phrase": Kind(
        lambda p: f'Finish your answer with the exact phrase "{p["phrase"]}". No other words should follow it.',
        lambda r, p: r.rstrip().endswith(p["phrase"]),
        frozenset({"end", "case"}),
        lambda rng, topic: {"phrase": rng.choice(END_PHRASES)},
    ),
    "postscript": Kind(
        lambda p: 'At the end of your answer, add a postscript starting with "P.S."',
        lambda r, p: re.search(r"(?m)^\s*P\.S\.", r) is not None,
        frozenset({"end", "case"}),
    ),
    "start_word": Kind(
        lambda p: f'Start your answer with the word "{p["word"]}".',
        lambda r, p: bool(_words(r)) and _words(r)[0].lower() == p["word"].lower(),
        frozenset({"start"}),
        lambda rng, topic: {"word": rng.choice(START_WORDS)},
    ),
    "no_commas": Kind(
        lambda p: "Do not use any commas in your answer.", lambda r, p: "," not in r, frozenset({"commas"})
    ),
    "bullets": Kind(
        lambda p: f'Your answer must contain exactly {p["n"]} bullet points, each on its own line starting with "* ".',
        lambda r, p: len(re.findall(r"(?m)^\s*\* ", r)) == p["n"],
        frozenset({"structure"}),
        lambda rng, topic: {"n": rng.choice([2, 3, 4])},
    ),
    "quoted": Kind(
        lambda p: "Wrap your entire answer in double quotation marks.",
        lambda r, p: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
        frozenset({"start", "end"}),
    ),
    "title": Kind(
        lambda p: "Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
        lambda r, p: re.search(r"<<[^<>\n]+>>", r) is not None,
        frozenset({"start"}),
    ),
    "placeholders": Kind(
        lambda p: f"Include at least {p['n']} placeholders in square brackets, such as [address].",
        lambda r, p: len(re.findall(r"\[[^\[\]\n]+\]", r)) >= p["n"],
        frozenset({"placeholders"}),
        lambda rng, topic: {"n": rng.choice([1, 2, 3])},
    ),
    "json": Kind(
        lambda p: "Wrap your entire output in JSON format.",
        lambda r, p: _is_json(r),
        frozenset({"start", "end", "structure", "commas", "case", "placeholders"}),
    ),
    "sections": Kind(
        lambda p: f'Your answer must have {p["n"]} sections; begin each with "SECTION X" (X its number).',
        lambda r, p: len(re.findall(r"(?m)^\s*SECTION \d+", r)) == p["n"],
        frozenset({"structure", "case", "start"}),
        lambda rng, topic: {"n": rng.choice([2, 3])},
    ),
}


def build_items(n: int = N_PROMPTS) -> list[dict]:
    """The prompts, each with its instructions as JSON: {"id", "query", "checks", "answers"}."""
    items = []
    names = sorted(KINDS)
    for i in range(n):
        rng = random.Random(f"if/{i}")
        topic, form = TOPICS[i % len(TOPICS)], rng.choice(FORMS)
        chosen: list[tuple[str, dict]] = []
        used: set[str] = set()
        for name in rng.sample(names, len(names)):
            kind = KINDS[name]
            if kind.parts & used:
                continue
            chosen.append((name, kind.params(rng, topic)))
            used |= kind.parts
            if len(chosen) == 1 + (i % 2):  # one instruction in half the prompts, two in the rest
                break
        text = " ".join(KINDS[name].text(params) for name, params in chosen)
        checks = [{"kind": name, **params} for name, params in chosen]
        items.append(
            {
                "id": f"if/{i}",
                "query": f"Write {form} about {topic}. {text}",
                "checks": json.dumps(checks),
                "answers": [""],
            }
        )
    return items


def follows(response: str, checks: list[dict]) -> list[bool]:
    """For each instruction, whether the response follows it."""
    out = []
    for c in checks:
        params = {k: v for k, v in c.items() if k != "kind"}
        out.append(bool(KINDS[c["kind"]].check(response.strip(), params)))
    return out


def process_results(doc: dict, results: list) -> dict:
    """lm-eval hook: results[0] is the greedy completion."""
    ok = follows(str(results[0]), json.loads(doc["checks"]))
    return {"acc": float(all(ok)), "inst_acc": sum(ok) / len(ok)}
