"""Task and suite registries: quantshift's own tasks over local JSON, and named suites.

A *task* here is data quantshift prepares itself (from installed packages, a downloaded
archive, or files under --data-dir) and hands to lm-evaluation-harness as an ordinary YAML
task over local JSONL files, so one scoring path serves online and offline users. Any name
not registered here is passed to lm-eval as one of its own tasks (arc_easy, hellaswag, ...).

Every task's items are split once, deterministically, into a *test* part (scored, in a fixed
shuffled order so `limit` takes a random-looking but reproducible sample) and a *pool* part
(few-shot exemplars and calibration text). Pool items sharing an id or a 13-gram with any
test item are dropped, so neither few-shot prompts nor `task:<name>` calibration ever contain
scored text.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..data.sources import TextSource, register_source_resolver
from ..errors import ConfigError, DataError
from ..registry import Registry
from . import localdata, offline
from .leakage import drop_overlapping
from .taskdef import TaskDef

DEFAULT_LIMIT = 200  # items scored per local task unless --limit says otherwise


TASKS: Registry[TaskDef] = Registry("task")


@dataclass(frozen=True)
class SuiteDef:
    name: str
    description: str
    tasks: tuple[str, ...] = ()
    ppl: tuple[str, ...] = ()
    shots: tuple[int, ...] = (0,)
    categories: dict = field(default_factory=dict)  # category -> [task names]
    shots_per_task: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # network, data-dir, download, judge
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    notes: str = ""
    path: str = ""

    def category_of(self, task: str) -> str:
        for cat, names in self.categories.items():
            if task in names:
                return cat
        return ""


SUITES: Registry[SuiteDef] = Registry("suite")


def fixed_shots(name: str, suite: str | None = None) -> int | None:
    """A task's own shot count (BOSS's per-task counts: the suite's shots_per_task, else the
    task's default_shots), or None for a task that takes the caller's. It is the count used when
    none is asked for, not a lock."""
    if suite is not None and name in SUITES.get(suite).shots_per_task:
        return int(SUITES.get(suite).shots_per_task[name])
    task = TASKS.get(name) if name in TASKS else None
    return task.default_shots if task is not None else None


# The evaluation dimensions of the quantization-evaluation literature, the one place that groups
# task categories (TaskDef.category, or a suite's `categories` key) into them: what a model knows
# and can do, multi-step reasoning, and alignment (social bias: BBQ; helpful/honest/harmless: HHH;
# truthfulness; instruction following). Held-out text is the fourth dimension, language modelling.
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "knowledge/capability": (
        "knowledge",
        "qa",
        "commonsense",
        "nli",
        "sentiment",
        "stem",
        "humanities",
        "social science",
        "other",
        "boss_eqa",
        "boss_sa",
        "boss_nli",
        "boss_td",
        "eqa",
        "sa",
        "td",
        "coreference",
        "dialogue",
        "scientific_qa",
        "reading_comprehension",
        "nli_classification",
        "linguistic",
        "commonsense_qa",
        "knowledge_language",
    ),
    "reasoning": ("reasoning", "math", "logic", "mathematics"),
    "alignment": (
        "bias",
        "toxicity",
        "bias_toxicity",
        "ethics_bias",
        "truthfulness",
        "instruction",
        "hallucination",
        "instruction_following",
    ),
}
LANGUAGE_MODELLING = "language modelling"


def dimension_of(category: str | None) -> str:
    """The dimension of a task category (case-insensitive); "unassigned" for one not listed."""
    c = (category or "").strip().lower()
    return next((d for d, cats in DIMENSIONS.items() if c in cats), "unassigned")


_SUITE_KEYS = {
    "name",
    "description",
    "tasks",
    "ppl",
    "shots",
    "categories",
    "shots_per_task",
    "needs",
    "metrics",
    "notes",
}


def _load_suites() -> None:
    import yaml

    for path in sorted((Path(__file__).parent / "suites").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        unknown = set(raw) - _SUITE_KEYS
        if unknown:
            raise ConfigError(
                f"{path.name}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_SUITE_KEYS))}"
            )
        cats = {str(k): list(v) for k, v in (raw.get("categories") or {}).items()}
        tasks = list(raw.get("tasks") or [])
        for names in cats.values():  # categories list tasks too; keep their order
            tasks += [t for t in names if t not in tasks]
        SUITES.add(
            raw["name"],
            SuiteDef(
                raw["name"],
                " ".join(str(raw["description"]).split()),
                tuple(tasks),
                tuple(raw.get("ppl") or ()),
                tuple(raw.get("shots") or (0,)),
                cats,
                dict(raw.get("shots_per_task") or {}),
                tuple(raw.get("needs") or ()),
                tuple(raw.get("metrics") or ("acc", "acc_norm")),
                str(raw.get("notes") or ""),
                str(path),
            ),
        )


# ---------------------------------------------------------------- splitting


def _h(*parts: str) -> int:
    return int(hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:12], 16)


def item_text(task: TaskDef, item: dict, with_answer: bool = True) -> str:
    """An item as the model reads it: the prompt template, plus the gold answer by default."""
    q = item["query"]
    if not with_answer:
        return q
    ans = item["choices"][item["gold"]] if task.kind == "mc" else (item.get("answers") or [""])[0]
    return q + task.target_delimiter + ans


@dataclass
class TaskData:
    task: TaskDef
    test: list[dict]  # scored part, in scoring order
    pool: list[dict]  # few-shot part, leakage-filtered
    dropped: int  # pool items removed for sharing an id or 13-gram with a test item
    calib: list[dict] = field(default_factory=list)  # calibration text: the pool, or items carved from test

    def scored(self, limit: int | None) -> list[dict]:
        return self.test[:limit] if limit else self.test


CALIB_CARVE_SEED = 42


def split_items(task: TaskDef, items: list[dict]) -> TaskData:
    seen: set[str] = set()
    for it in items:
        if it["id"] in seen:
            raise DataError(f"task {task.name}: duplicate item id {it['id']!r}")
        seen.add(it["id"])
    if any("split" in it for it in items):
        test = [it for it in items if it.get("split") == "test"]
        pool = [it for it in items if it.get("split") != "test"]
    else:
        groups = _overlap_groups(task, items)
        test, pool = [], []
        for it, g in zip(items, groups):
            (test if _h(task.name, "split", g) % 10_000 < task.test_frac * 10_000 else pool).append(it)
    test.sort(key=lambda it: _h(task.name, "order", it["id"]))
    pool.sort(key=lambda it: _h(task.name, "order", it["id"]))
    if not test:
        raise DataError(f"task {task.name}: no items to score")
    pool, dropped = drop_overlapping(pool, test, lambda d: item_text(task, d))
    calib = pool
    if task.calib_from_test:
        order = sorted(test, key=lambda it: str(it["id"]))
        random.Random(CALIB_CARVE_SEED).shuffle(order)
        calib = order[: min(task.calib_from_test, len(order) // 2)]
        carved = {it["id"] for it in calib}
        test = [it for it in test if it["id"] not in carved]
    return TaskData(task, test, pool, dropped, calib)


def _overlap_groups(task: TaskDef, items: list[dict]) -> list[str]:
    """Split units: items sharing a (non-template) 13-gram end up on the same side.

    Many datasets reuse a passage across items (one Winograd sentence with several candidate
    reasons, one premise with several hypotheses); splitting item by item would put the same
    passage on both sides and the leakage filter would then empty the pool.
    """
    from .leakage import ngrams, template_ngrams

    texts = [item_text(task, it) for it in items]
    common = template_ngrams(texts)
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for i, t in enumerate(texts):
        for g in ngrams(t) - common:
            j = first.setdefault(g, i)
            if j != i:
                parent[find(i)] = find(j)
    by_group: dict = {}
    for i, it in enumerate(items):  # an explicit group (BBQ template) joins its members too
        if "group" in it:
            j = by_group.setdefault(str(it["group"]), i)
            parent[find(i)] = find(j)
    # name each group by its first item: the union-find root depends on the order of unions,
    # which follows set iteration order and so Python's per-process string hashing; the split
    # must be the same in every process (a resumed study, the fp and quantized evaluations)
    first_of: dict[int, int] = {}
    for i in range(len(items)):
        first_of.setdefault(find(i), i)
    return [str(items[first_of[find(i)]]["id"]) for i in range(len(items))]


@cache
def _task_data_cached(name: str, data_dir: str | None) -> TaskData:
    task = TASKS.get(name)
    items = task.load_items(Path(data_dir) if data_dir else None)
    return split_items(task, items)


def task_data(name: str, data_dir: Path | str | None = None) -> TaskData:
    return _task_data_cached(name, str(data_dir) if data_dir else None)


# ---------------------------------------------------------------- lm-eval task files


def materialize(data: TaskData, root: Path, with_pool: bool = True) -> tuple[str, Path]:
    """Write the task as lm-eval YAML + JSONL under root; returns (lm-eval task name, its dir).
    `with_pool=False` (0-shot only) leaves the few-shot pool out: lm-eval would read it for nothing.

    The file names carry a content hash: `datasets` caches JSON by path, and a changed file
    under an old name could otherwise be served stale.
    """
    import yaml

    task = data.task
    body = {"test": data.test, **({"train": data.pool} if with_pool and data.pool else {})}
    digest = hashlib.sha256(
        json.dumps([task.name, body, task.preamble, task.kind], sort_keys=True).encode()
    ).hexdigest()[:12]
    lm_name = f"qs_{task.name}"
    d = root / f"{task.name}-{digest}"
    files = {sp: d / f"{sp}.jsonl" for sp in body}
    cfg: dict = {
        "task": lm_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {sp: str(p) for sp, p in files.items()}},
        "test_split": "test",
        "doc_to_text": "{{query}}",
        "target_delimiter": task.target_delimiter,
        "fewshot_delimiter": task.fewshot_delimiter,
        "metadata": {"version": 1, "quantshift_task": task.name},
    }
    if "train" in body:
        cfg.update({"training_split": "train", "fewshot_split": "train"})
        if "shot" in data.pool[0]:  # exemplars drop the "### Input ###" header (BOSS)
            cfg["fewshot_config"] = {"sampler": "default", "doc_to_text": "{{shot}}"}
    if task.preamble:
        cfg["description"] = task.preamble
    elif any(it.get("preamble") for it in data.test):
        cfg["description"] = "{{preamble}}"  # per-item (BIG-bench task_prefix)
    if task.kind == "mc":
        cfg.update(
            {
                "output_type": "multiple_choice",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{gold}}",
                "metric_list": [
                    {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
                ],
            }
        )
    else:
        # "gen": exact match / F1 against the answers; "instruct": verifiable instructions
        hook, metrics = (
            ("process_instructions", ("acc", "inst_acc"))
            if task.kind == "instruct"
            else ("process_results", ("exact_match", "f1"))
        )
        cfg.update(
            {
                "output_type": "generate_until",
                "doc_to_target": "{{answers[0]}}",
                "generation_kwargs": {"until": list(task.until), "do_sample": False, "max_gen_toks": task.max_gen_toks},
                "process_results": f"!function qs_metrics.{hook}",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
            }
        )
    if (d / f"{lm_name}.yaml").is_file():
        return lm_name, d
    tmp = d.with_name(d.name + f".tmp{__import__('os').getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for sp, rows in body.items():
        with (tmp / f"{sp}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "split"}, ensure_ascii=False) + "\n")
    text = yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False)
    # lm-eval resolves `!function module.fn` next to the YAML: a two-line shim into our metrics
    text = re.sub(r"'(!function qs_metrics\.\w+)'", r"\1", text)
    (tmp / f"{lm_name}.yaml").write_text(text, encoding="utf-8")
    if task.kind != "mc":
        (tmp / "qs_metrics.py").write_text(
            "from quantshift.evaluation.instructions import process_results as process_instructions  # noqa: F401\n"
            "from quantshift.evaluation.metrics import process_results  # noqa: F401\n"
        )
    try:
        tmp.rename(d)
    except OSError:  # another process wrote the same content first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return lm_name, d


# ---------------------------------------------------------------- calibration sources


def task_source(pattern: str, data_dir: Path | str | None = None, answers: bool = True) -> TextSource:
    """`task:<pattern>`: calibration text from tasks (a name or a glob such as `ceval_*`).

    "calib" is each task's calibration part, formatted with the task's prompt template, with the
    answer (`answers=False`: the prompt only): its unscored pool, or, for a dataset
    with only a test split (BOSS OOD sets, CMMLU), the items carved out of it, which the task then
    no longer scores; "heldout" is the scored items. Data loads lazily, on first use.
    """
    import fnmatch

    names = [n for n in TASKS.names() if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        raise ConfigError(f"source task:{pattern}: no task matches (see `quantshift list tasks`)")

    def load(split: str) -> list[str]:
        docs: list[str] = []
        for n in names:
            data = task_data(n, data_dir)
            docs += [
                item_text(data.task, it, with_answer=answers) for it in (data.calib if split == "calib" else data.test)
            ]
        return docs

    first = TASKS.get(names[0])
    what = first.description if len(names) == 1 else f"items of {', '.join(names)}"
    return TextSource(f"task:{pattern}", what, list, language=first.language, load_split=load)


def _register_all() -> None:
    for task in localdata.task_defs() + offline.task_defs():
        TASKS.add(task.name, task)
    _load_suites()
    register_source_resolver("task:", task_source)


_register_all()
