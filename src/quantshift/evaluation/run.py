"""evaluate(): perplexity and lm-eval tasks on a model held in memory, one metrics map out.

metrics keys: "ppl:<source>" -> PerplexityResult.to_dict();
              "task:<name>@<shots>" -> {"acc", "acc_ci", "acc_norm", "acc_norm_ci", "n", "limit", "category", ...}
samples keys: the same task keys -> one record per scored item {"id", "acc", "acc_norm", "lls", "pred", "gold"}.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..errors import ConfigError, DataError, QuantshiftError
from . import harness
from .leakage import check_leakage, find_overlaps
from .tasks import (
    DEFAULT_LIMIT,
    SUITES,
    TASKS,
    TaskData,
    TaskDef,
    fixed_shots,
    item_text,
    materialize,
    split_items,
    task_data,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..models.load import LoadedModel

# one lm-eval run of a task: (task key name, TaskDef | lm-eval name, shots, category)
TaskRun = tuple[str, TaskDef | str, int, str]


@dataclass
class EvalResult:
    metrics: dict[str, dict] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics}

    def write(self, json_path: Path, extra: dict | None = None) -> Path:
        """metrics JSON at json_path, sample-level scores beside it (<stem>.samples.jsonl)."""
        from ..atomic import write_atomic, write_json_atomic

        samples_path = samples_file(json_path)

        def lines(f: IO[bytes]) -> None:
            for key, rows in self.samples.items():
                for r in rows:
                    f.write((json.dumps({"key": key, **r}, ensure_ascii=False) + "\n").encode("utf-8"))

        write_atomic(samples_path, lines)
        write_json_atomic(json_path, {**(extra or {}), "metrics": self.metrics, "samples_file": samples_path.name})
        return samples_path


def samples_file(json_path: Path) -> Path:
    """Where EvalResult.write puts the sample-level scores of a metrics JSON."""
    return json_path.with_name(json_path.stem + ".samples.jsonl")


def task_root() -> Path:
    from .offline import cache_root

    return cache_root() / "lm-eval-tasks"


def _resolve(
    tasks: Iterable, suite: str | None, shots: Sequence[int] | None, ppl: Iterable[str]
) -> tuple[list[str], list[TaskRun]]:
    """-> (ppl sources, [(task key name, TaskDef | lm-eval name, shots, category)]).
    shots None: each task's own count where it has one (fixed_shots), else the suite's counts,
    else 0; given: exactly those counts for every task."""
    ppl = list(ppl)
    names: list = list(tasks)
    cats: dict[str, str] = {}
    base = list(shots) if shots is not None else [0]
    if suite is not None:
        s = SUITES.get(suite)
        names = list(s.tasks) + [t for t in names if t not in s.tasks]
        ppl = list(s.ppl) + [p for p in ppl if p not in s.ppl]
        cats = {t: s.category_of(t) for t in s.tasks}
        base = list(shots) if shots is not None else list(s.shots)
    runs = []
    for t in names:
        tdef = t if isinstance(t, TaskDef) else (TASKS.get(t) if t in TASKS else None)
        name = tdef.name if tdef else str(t)
        own = fixed_shots(name, suite)
        if own is None and tdef is not None:  # a TaskDef passed in, not registered
            own = tdef.default_shots
        k_list = [own] if shots is None and own is not None else base
        for k in k_list:
            runs.append((name, tdef or name, int(k), cats.get(name) or (tdef.category if tdef else "")))
    return ppl, runs


def preflight(*, tasks: Iterable = (), suite: str | None = None, data_dir: str | Path | None = None) -> None:
    """Load every quantshift task's data now (before a model loads): missing files fail fast."""
    _ppl, runs = _resolve(tasks, suite, None, ())
    for name, t, _k, _c in runs:
        if isinstance(t, TaskDef) and t.name in TASKS:
            task_data(name, data_dir)


CHAT_TEMPLATE_MODES = ("off", "auto", "on")


def use_chat_template(tokenizer: PreTrainedTokenizerBase, mode: str) -> bool:
    """Whether task prompts go through the tokenizer's chat template: "on" (the tokenizer must
    have one), "auto" (when it has one), "off" (raw prompts, as base models are scored)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"--chat-template must be {', '.join(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ConfigError(
            "--chat-template on: this model's tokenizer has no chat template (a base model?); use auto or off"
        )
    return has and mode != "off"


def evaluate(
    loaded: LoadedModel,
    *,
    ppl: Iterable[str] = (),
    tasks: Iterable = (),
    suite: str | None = None,
    shots: Sequence[int] | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    seqlen: int = 512,
    max_windows: int | None = 64,
    batch_size: int = 4,
    seed: int = 1234,
    progress: bool = True,
    chat_template: str = "off",
) -> EvalResult:
    """Perplexity on text sources and lm-eval tasks (ours or lm-eval's own names) for one model.

    limit: items scored per task; None = DEFAULT_LIMIT for quantshift's own tasks and all items
    for lm-eval's tasks; 0 = all items everywhere. Scored items are a fixed, seeded-by-name
    subset, so two models scored with the same limit see the same items. shots: see _resolve
    (None: each task's own count, BOSS's per-task counts, else the suite's, else 0). chat_template: task
    prompts through the tokenizer's chat template (use_chat_template; few-shot examples then as
    earlier turns, lm-eval's fewshot_as_multiturn); perplexity always scores raw text.
    """
    from .perplexity import perplexity

    chat = use_chat_template(loaded.tokenizer, chat_template)
    ppl_sources, runs = _resolve(tasks, suite, shots, ppl)
    if not ppl_sources and not runs:
        raise ConfigError("nothing to evaluate: give perplexity sources, tasks or a suite")
    res = EvalResult()
    for src in ppl_sources:
        r = perplexity(
            loaded,
            loaded.tokenizer,
            src,
            seqlen=seqlen,
            max_windows=max_windows or None,
            add_bos=loaded.needs_bos,
            batch_size=batch_size,
            progress=progress,
            max_windows_per_pass=_windows_per_pass(loaded, seqlen, batch_size),
        )
        res.metrics[f"ppl:{src}"] = r.to_dict()
    if runs:
        dispatch_streamed(loaded)
        with loaded.compute():
            _run_tasks(
                loaded,
                runs,
                res,
                limit=limit,
                data_dir=data_dir,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
                chat=chat,
            )
    return res


def _windows_per_pass(loaded: LoadedModel, seqlen: int, batch_size: int) -> int | None:
    """How many windows a block-streamed perplexity pass holds within the memory plan."""
    if loaded.source is None or loaded.memory is None:
        return None
    from ..memory import windows_per_pass

    return windows_per_pass(loaded.memory, seqlen, batch_size)


def dispatch_streamed(loaded: LoadedModel) -> None:
    """A model whose weights are on disk runs whole (lm-eval, generation) through accelerate's
    offload hooks (models.dispatch): what fits the memory plan stays resident. Once per model."""
    if loaded.source is None or loaded.dispatched is not None:
        return
    from ..memory import device_resident_budget, resident_budget
    from ..models.dispatch import dispatch

    host = resident_budget(loaded.memory) if loaded.memory is not None else 0
    on_device = device_resident_budget(loaded.memory) if loaded.memory is not None else None
    block = type(loaded.arch.blocks(loaded.model)[0]).__name__
    loaded.dispatched = dispatch(
        loaded.model, loaded.source, loaded.device, host if on_device is None else on_device, host, no_split=[block]
    )
    print(loaded.dispatched.line())


def _run_tasks(
    loaded: LoadedModel,
    runs: list[TaskRun],
    res: EvalResult,
    *,
    limit: int | None,
    data_dir: str | Path | None,
    batch_size: int,
    seed: int,
    progress: bool,
    chat: bool = False,
) -> None:
    local: dict[str, TaskData] = {}
    for name, t, _k, _c in runs:
        if isinstance(t, TaskDef) and name not in local:
            local[name] = (
                split_items(t, t.load_items(Path(data_dir) if data_dir else None))
                if t.name not in TASKS
                else task_data(name, data_dir)
            )
    local_limit = DEFAULT_LIMIT if limit is None else (limit or None)
    for data in local.values():
        _guard_fewshot(data, local_limit)
    _guard_calibration(loaded, local, local_limit)
    lm_names, dirs = {}, {}
    for name, data in local.items():
        shots_used = [k for n, _t, k, _c in runs if n == name]
        lm_names[name], dirs[name] = materialize(data, task_root(), with_pool=any(shots_used))
    lm = harness.make_lm(loaded, batch_size)
    # one lm-eval call per (shots, kind of task): limits and offline mode differ between ours and lm-eval's
    groups: dict[tuple[int, bool], list] = {}
    for run in runs:
        groups.setdefault((run[2], run[0] in local), []).append(run)
    for (k, is_local), group in groups.items():
        names = [lm_names[n] if is_local else n for n, *_ in group]
        t0 = time.time()
        raw = harness.run(
            lm,
            names,
            shots=k,
            limit=local_limit if is_local else (limit or None),
            include_paths=[dirs[n] for n, *_ in group if n in dirs],
            offline=is_local,
            seed=seed,
            progress=progress,
            include_defaults=not is_local,
            chat=chat,
        )
        took = time.time() - t0
        samples = raw.get("samples") or {}
        for name, _t, _k, cat in group:
            key = lm_names.get(name, name)
            if key in samples:
                rows = harness.convert_samples(samples[key])
                entry = harness.summarize(rows, raw["results"].get(key), seed=seed)
                res.samples[f"task:{name}@{k}"] = rows
            else:  # an lm-eval group (mmlu, blimp, ...): pool its leaves' items
                leaves = _leaves(raw, key)
                rows = [r for leaf in leaves for r in harness.convert_samples(samples.get(leaf, []))]
                if not rows and key not in raw["results"]:
                    raise DataError(f"lm-eval returned no results for task {name!r}")
                entry = harness.summarize(rows, raw["results"].get(key), seed=seed)
                for leaf in leaves:
                    if leaf in samples:
                        leaf_rows = harness.convert_samples(samples[leaf])
                        res.metrics[f"task:{leaf}@{k}"] = {
                            **harness.summarize(leaf_rows, raw["results"].get(leaf), seed=seed),
                            "shots": k,
                            "limit": limit or None,
                            "category": cat,
                            "chat_template": chat,
                            "source": "lm-eval",
                            "group": name,
                        }
                        res.samples[f"task:{leaf}@{k}"] = leaf_rows
            entry.update(
                {
                    "shots": k,
                    "limit": local_limit if is_local else (limit or None),
                    "category": cat,
                    "chat_template": chat,
                    "seconds": round(took, 1),
                }
            )
            if is_local:
                d = local[name]
                entry.update(
                    {
                        "source": "quantshift",
                        "items_test": len(d.test),
                        "pool": len(d.pool),
                        "pool_dropped_overlap": d.dropped,
                        "data": d.task.source_note,
                    }
                )
            else:
                entry["source"] = "lm-eval"
            res.metrics[f"task:{name}@{k}"] = entry


def _leaves(raw: dict, key: str) -> list[str]:
    out: list[str] = []
    todo = [key]
    gs = raw.get("group_subtasks") or {}
    while todo:
        g = todo.pop()
        for sub in gs.get(g, []):
            (todo if sub in gs else out).append(sub)
    return out


# guards already passed in this process (a study evaluates many models); the values keep the
# TaskData objects alive so that their ids, part of the keys, are never reused
_CHECKED: dict[tuple, TaskData] = {}


def _guard_fewshot(data: TaskData, limit: int | None) -> None:
    """Few-shot exemplars come from the pool: it must share no id and no 13-gram with scored items."""
    key = ("fewshot", id(data), limit)
    if key in _CHECKED:
        return
    _check_fewshot(data, limit)
    _CHECKED[key] = data


def _check_fewshot(data: TaskData, limit: int | None) -> None:
    scored = [(it["id"], item_text(data.task, it, with_answer=False)) for it in data.scored(limit)]
    # template n-grams are judged on the whole task, as when the split was made
    population = [item_text(data.task, it) for it in data.test + data.pool]
    check_leakage(
        scored,
        [(it["id"], item_text(data.task, it)) for it in data.pool],
        f"the few-shot pool of task {data.task.name}",
        population=population,
    )


def _guard_calibration(loaded: LoadedModel, local: dict[str, TaskData], limit: int | None) -> None:
    """A quantized model must not have been calibrated on text it is now scored on."""
    cal = (getattr(loaded, "quant_info", None) or {}).get("calibration") or {}
    src_name = cal.get("source")
    if not src_name or not local:
        return
    from ..data.sources import get_source

    try:
        src = get_source(src_name)
    except QuantshiftError:  # a source this machine cannot resolve: nothing to compare against
        return
    if src.online:
        return  # would need the network; calibration on web text is checked by the study runner
    split = cal.get("split", "calib")
    todo = {name: data for name, data in local.items() if ("calib", src_name, split, id(data), limit) not in _CHECKED}
    if not todo:
        return
    docs = src.documents(split)
    others = [(f"{src_name}#{i}", d) for i, d in enumerate(docs)]
    for name, data in todo.items():
        scored = [(it["id"], item_text(data.task, it, with_answer=False)) for it in data.scored(limit)]
        found = find_overlaps(scored, others)
        if found:
            msg = (
                f"leakage: calibration source {src_name!r} overlaps {len(found)} scored item(s) of task {name}: "
                + "; ".join(str(o) for o in found[:3])
            )
            if src_name.startswith("task:"):
                raise DataError(msg)
            warnings.warn(msg, stacklevel=3)
        _CHECKED[("calib", src_name, split, id(data), limit)] = data
