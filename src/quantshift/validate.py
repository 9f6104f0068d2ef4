"""Validate first: every command option, recipe and study is checked before a model loads or a
file is written, and a bad value fails at once with one line naming it and what is allowed.

The methods' own configs (pydantic, methods/*.py) stay the definition of what a stage accepts;
this module runs them early and adds what they only find out late: group sizes and override
formats (checked when the first block is quantized), regexes, stack rules (quip), names of
methods / tasks / suites / sources / models (with the closest valid name), output directories
that would be refused after the work, and calibration sources too short for n x seqlen.

Every check here is cheap: no model is loaded. A hub id cannot be checked offline; it is
accepted when it is well formed and fails on load with one line (models.load).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .config import (
    MAX_BATCH,
    MAX_COUNT,
    MAX_SEQLEN,
    MAX_SHOTS,
    abits_rule,
    group_size_rule,
    integer_rule,
    number_rule,
    seed_rule,
    user_path,
    wbits_rule,
)
from .errors import ConfigError, InvalidInput, QuantshiftError

if TYPE_CHECKING:
    from .evaluation.taskdef import TaskDef
    from .evaluation.tasks import SuiteDef
    from .methods.base import Method
    from .recipes import Recipe
    from .registry import Registry
    from .studies.spec import StudySpec

# a source with this many bytes of text per needed token has room to spare in any tokenizer
# seen here (English ~4 bytes per token, Chinese ~2-3); only closer calls are tokenized exactly
AMPLE_BYTES_PER_TOKEN = 8
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
# Hugging Face repo ids: org/name, letters digits - _ . (no '--' or '..', no leading/trailing - .)
HUB_ID_RE = re.compile(r"^[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9_](?:[\w.-]*[\w])?$")


def fail(message: str) -> NoReturn:
    raise InvalidInput(message)


def closest(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close."""
    match = difflib.get_close_matches(str(word), sorted(set(options)), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown(what: str, name: Any, options: Iterable[str], hint: str = "", where: str = "") -> NoReturn:
    opts = sorted(set(options))
    listed = ", ".join(opts) if len(opts) <= 40 else ", ".join(opts[:40]) + f", ... ({len(opts)} in all)"
    fail(f"{where + ': ' if where else ''}unknown {what} {name!r}{closest(name, opts)}; allowed: {listed}{hint}")


# ---------------------------------------------------------------- scalar options


def int_in(option: str, value: Any, lo: int, hi: int, extra: str = "") -> None:
    _rule(integer_rule, option, value, lo, hi, extra)


def finite_in(option: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    _rule(number_rule, option, value, lo, hi, lo_open)


def check_seed(option: str, value: Any) -> None:
    _rule(seed_rule, option, value)


def check_device(option: str, value: Any) -> None:
    if not isinstance(value, str) or not DEVICE_RE.match(value):
        fail(f"{option} must be auto, cpu, cuda or cuda:N, got {value!r}")


def check_dtype(option: str, value: Any) -> None:
    if value not in DTYPES:
        unknown("dtype", value, DTYPES, where=option)


def check_choice(option: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        fail(f"{option} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}{closest(value, allowed)}")


def split_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def int_list(option: str, text: str, lo: int, hi: int) -> list[int]:
    try:
        values = [int(x) for x in split_list(text)]
    except ValueError:
        fail(f"{option} takes comma-separated integers like 0,5, got {text!r}")
    if not values:
        fail(f"{option} takes comma-separated integers like 0,5, got {text!r}")
    for v in values:
        int_in(option, v, lo, hi)
    return values


# ---------------------------------------------------------------- paths


def check_existing_file(option: str, path: Any) -> Path:
    p = user_path(str(path))
    if not p.is_file():
        fail(f"{option} {str(path)!r} does not exist (or is not a file)")
    return p


def check_existing_dir(option: str, path: Any) -> Path:
    p = user_path(str(path))
    if not p.is_dir():
        fail(f"{option} {str(path)!r} does not exist (or is not a directory)")
    return p


def check_out_dir(option: str, path: Any, overwrite: bool) -> None:
    """An output directory the command may write at the end: checked now, not after the work."""
    p = user_path(str(path))
    if not str(path).strip():
        fail(f"{option} must name a directory, got an empty path")
    if p.exists() and not p.is_dir():
        fail(f"{option} {str(path)!r} is an existing file, not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        fail(f"{option} {str(path)!r} exists and is not empty (pass --overwrite to replace it)")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        fail(f"{option} {str(path)!r}: {parent} is a file, not a directory")


def check_out_file(option: str, path: Any) -> None:
    p = user_path(str(path))
    if not str(path).strip() or p.is_dir():
        fail(f"{option} {str(path)!r} must be a file path (it names a directory)")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        fail(f"{option} {str(path)!r}: {parent} is a file, not a directory")


# ---------------------------------------------------------------- models


def check_model_name(option: str, name: Any) -> None:
    """A bundled alias, an existing model directory, or a well-formed hub id (checked on load).
    Mirrors models.load.model_path without its side effect (converting a bundled model)."""
    from .models.bundled import BUNDLED

    name = str(name)
    if name in BUNDLED:
        return
    p = user_path(name)
    if name.strip() and p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            fail(f"{option} {name!r} is not a model directory (no config.json)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        fail(f"{option}: model path {name!r} does not exist")
    if "/" not in name:
        unknown("model", name, BUNDLED.names(), " (or a local model directory, or a hub id org/name)")
    if len(name) > 96 or "--" in name or ".." in name or not HUB_ID_RE.match(name):
        fail(
            f"{option}: {name!r} is neither a bundled model ({', '.join(BUNDLED.names())}), "
            "an existing directory, nor a hub id like org/name"
        )


def local_model_dir(name: str) -> Path | None:
    """Where a model's files already are on disk (no conversion, no download), if anywhere."""
    from .models.bundled import BUNDLED, cache_dir

    if name in BUNDLED:
        p = cache_dir() / "models" / name
        return p if (p / "config.json").is_file() else None
    p = user_path(name)
    return p if (p / "config.json").is_file() else None


def model_config(name: str) -> dict | None:
    """A model's config.json when it is already on disk (the text part of a multimodal one)."""
    import json

    local = local_model_dir(name)
    if local is None:
        return None
    try:
        cfg = json.loads((local / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else None


def check_context(option: str, tokens: int, model: str) -> None:
    """Windows longer than the model's context fail (or silently degrade) only after it loads."""
    cfg = model_config(model)
    ctx = cfg.get("max_position_embeddings") if cfg else None
    if isinstance(ctx, int) and ctx > 0 and tokens > ctx:
        fail(f"{option} {tokens} is longer than {model}'s context of {ctx} tokens (max_position_embeddings)")


# ---------------------------------------------------------------- text sources and tasks


def _task_registry() -> tuple[Registry[TaskDef], Registry[SuiteDef]] | tuple[None, None]:
    try:
        from .evaluation.tasks import SUITES, TASKS
    except ImportError:  # a build without the task engine
        return None, None
    return TASKS, SUITES


def _needs_data_dir(task_names: Iterable[str]) -> list[str]:
    tasks, _ = _task_registry()
    return [n for n in task_names if tasks is not None and n in tasks and tasks.get(n).needs == "data-dir"]


def check_source(option: str, name: Any, data_dir: Any = None, union: bool = True) -> list[str]:
    """The parts of a text source name ('a+b' when `union`), each one that get_source accepts."""
    from .data.sources import SOURCES

    name = str(name)
    parts = [p.strip() for p in name.split("+")] if union else [name]
    if any(not p for p in parts):
        fail(f"{option} {name!r}: empty source name" + (" in a '+' union" if len(parts) > 1 else ""))
    for part in parts:
        if part.startswith("task:"):  # same order as data.sources.get_source
            tasks, _ = _task_registry()
            pattern = part[5:]
            names = [n for n in tasks.names() if fnmatch.fnmatchcase(n, pattern)] if tasks is not None else []
            if not names:
                unknown(
                    "task",
                    pattern,
                    tasks.names() if tasks is not None else [],
                    " (task:<name or glob>, see `quantshift list tasks`)",
                    where=f"{option} {part!r}",
                )
            if _needs_data_dir(names) and not data_dir:
                fail(f"{option} {part!r} reads data-dir tasks: give --data-dir (or data_dir) too")
        elif part in SOURCES:
            continue
        elif Path(part).suffix in (".txt", ".jsonl"):
            if not user_path(part).is_file():
                fail(f"{option}: text file {part!r} does not exist")
        elif part.startswith("hf:"):
            if not part[3:].split(":")[0].strip():
                fail(f"{option} {part!r}: give a dataset, hf:<dataset>[:<config>]")
        else:
            unknown(
                "source",
                part,
                SOURCES.names(),
                " (or task:<name>, a .txt/.jsonl file, hf:<dataset>[:<config>])",
                where=option,
            )
    return parts


@cache
def _calib_text_bytes(name: str) -> int | None:
    """Bytes of a source's calibration text when it is on this machine (offline sources, local
    files); None for online and task sources, whose text needs a download or the task data."""
    from .data.sources import SOURCES, get_source

    if name.startswith(("task:", "hf:")) or (name in SOURCES and SOURCES.get(name).online):
        return None
    try:
        return len(get_source(name).text("calib").encode("utf-8"))
    except QuantshiftError:
        return None  # unreadable now: the build reports it with its own one-line error


@cache
def _calib_documents(name: str) -> int | None:
    """How many calibration documents a source has, when that is known without a download."""
    from .data.sources import SOURCES, get_source

    if name.startswith(("task:", "hf:")) or (name in SOURCES and SOURCES.get(name).online):
        return None
    try:
        return len(get_source(name).documents("calib"))
    except QuantshiftError:
        return None


def check_calib_examples(option: str, source: str, n: int) -> None:
    """Examples mode takes n documents from each source: fewer fails after the model loads."""
    for part in check_source(option, source):
        docs = _calib_documents(part)
        if docs is not None and docs < n:
            fail(f"{option} {part!r} has {docs} calibration examples; asked for n = {n}")


@cache
def _calib_tokens(name: str, tokenizer_dir: str) -> int | None:
    """Exact token count of a source's calibration text with a tokenizer already on disk."""
    from .data.sources import SOURCES, get_source

    if name.startswith(("task:", "hf:")) or (name in SOURCES and SOURCES.get(name).online):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        text = get_source(name).text("calib")
        return len(tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    except Exception:  # no usable tokenizer there: fall back to the byte bound
        return None


def check_calib_budget(
    option: str, source: str, n: int, seqlen: int, model: str | None = None, exact: bool = True
) -> str:
    """Fail when a calibration source cannot hold n windows of seqlen tokens; returns a note on
    how that was known. Exact with the model's tokenizer when it is already on disk; otherwise a
    sound bound (a token is at least one byte of text) that only rejects what surely fails."""
    notes = []
    for part in check_source(option, source):
        body = seqlen - 1  # with a BOS token a window holds seqlen - 1 text tokens
        nbytes = _calib_text_bytes(part)
        if nbytes is not None and nbytes // body >= AMPLE_BYTES_PER_TOKEN * n:
            notes.append(f"{part}: {nbytes} bytes, ample for {n} x {seqlen} tokens")
            continue  # far more text than needed: not worth tokenizing twice
        local = local_model_dir(model) if (model and exact and nbytes is not None) else None
        tokens = _calib_tokens(part, str(local)) if local is not None else None
        if tokens is not None:
            if tokens // body < n:
                fail(
                    f"{option} {part!r} has {tokens} calibration tokens = {tokens // body} windows of {seqlen}; "
                    f"asked for {n} (use a smaller --nsamples/n or --seqlen)"
                )
            notes.append(f"{part}: {tokens} tokens")
            continue
        if nbytes is None:
            notes.append(f"{part}: size not checked (needs a download or the task data)")
        elif nbytes // body < n:
            fail(
                f"{option} {part!r} has {nbytes} bytes of calibration text, fewer than {n} x {seqlen} tokens "
                f"need (use a smaller --nsamples/n or --seqlen)"
            )
        else:
            notes.append(f"{part}: {nbytes} bytes (tokens counted when the tokenizer loads)")
    return "; ".join(notes)


_LM_EVAL_KEY = re.compile(r"^(?:task|group|tag):[ \t]*['\"]?([^\s'\"#\[\]{},]+)", re.M)
_LM_EVAL_TAGS = re.compile(r"^tag:[ \t]*\n((?:[ \t]*-[ \t]*\S+[ \t]*\n)+)", re.M)


@cache
def _lm_eval_quick_names() -> frozenset[str]:
    """Task, group and tag names read straight off lm-eval's YAML files (well under a second;
    lm-eval's own index takes seconds). Names made by templates are missing: see lm_eval_has."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    names: set[str] = set()
    for p in (Path(next(iter(spec.submodule_search_locations))) / "tasks").rglob("*.yaml"):
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        names.update(_LM_EVAL_KEY.findall(text))
        for block in _LM_EVAL_TAGS.findall(text):
            names.update(x.strip().lstrip("-").strip().strip("'\"") for x in block.splitlines())
    return frozenset(names)


@cache
def _lm_eval_all_names() -> frozenset[str]:
    """lm-eval's own index of every task, group and tag (authoritative, seconds to build)."""
    try:
        from lm_eval.tasks import TaskManager

        return frozenset(TaskManager().all_tasks)
    except Exception:  # lm-eval missing or broken: names cannot be checked here
        return frozenset()


def lm_eval_has(name: str) -> bool:
    return name in _lm_eval_quick_names() or name in _lm_eval_all_names()


def check_task(option: str, name: str, data_dir: Any = None) -> None:
    tasks, _ = _task_registry()
    if tasks is not None and name in tasks:
        if tasks.get(name).needs == "data-dir" and not data_dir:
            fail(f"{option}: task {name!r} reads local data: give --data-dir (or data_dir)")
        return
    if name.endswith((".yaml", ".yml")) and user_path(name).is_file():
        return  # an lm-eval task file
    if lm_eval_has(name):
        return
    ours = tasks.names() if tasks is not None else []
    match = closest(name, [*ours, *_lm_eval_quick_names()])
    fail(
        f"{option}: unknown task {name!r}{match}; allowed: quantshift's tasks (`quantshift list tasks`) "
        "or an lm-eval task, group or tag name"
    )


def check_suite(option: str, name: Any, data_dir: Any = None) -> None:
    _, suites = _task_registry()
    if suites is None:
        fail(f"{option} needs the task evaluation engine, which this build does not have")
    if name not in suites:
        unknown("suite", name, suites.names(), where=option)
    if "data-dir" in suites.get(name).needs and not data_dir:
        fail(f"{option} {name!r} reads local data: give --data-dir (or data_dir)")


# ---------------------------------------------------------------- YAML files and unknown keys


def read_yaml(option: str, path: Any) -> Any:
    """A YAML file's data; every way reading or parsing it can fail is one line."""
    import yaml

    p = check_existing_file(option, path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        fail(f"{p}: cannot read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        fail(f"{p}: not valid YAML ({(str(err).splitlines() or ['?'])[0]})")
    except (RecursionError, ValueError, OverflowError) as err:  # pathological nesting, bad scalars
        fail(f"{p}: not valid YAML ({type(err).__name__})")


def _model_of(annotation: Any) -> tuple[Any, bool] | None:
    """(pydantic model, is a list of them) for a field annotation, if it holds a model."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = getattr(annotation, "__origin__", None)
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found[0], found[1] or origin is list
    return None


def check_keys(model: Any, data: Any, where: str) -> None:
    """Unknown keys anywhere in `data` for `model` (nested models and lists of them included),
    named with the closest valid key. Types and values are left to the model's validation."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            fail(f"{where}: unknown key {str(key)!r}{closest(str(key), fields)}; allowed: {', '.join(sorted(fields))}")
        sub = _model_of(fields[key].annotation)
        if sub is None:
            continue
        inner, many = sub
        for i, item in enumerate(value if many and isinstance(value, list) else [value]):
            check_keys(inner, item, f"{where} {key}" + (f"[{i}]" if many else ""))


# ---------------------------------------------------------------- recipes


def _methods() -> Registry[type[Method]]:
    from .methods import METHODS

    return METHODS


def check_method_name(where: str, name: Any) -> None:
    if not isinstance(name, str) or name not in _methods():
        unknown("method", name, _methods().names(), where=where)


def check_recipe_data(data: Any, where: str = "recipe") -> Recipe:
    """Raw recipe data (a recipe file's content) -> Recipe, or one line on the first problem."""
    from .recipes import recipe_from_dict

    if isinstance(data, dict):
        for key in data:
            if key != "stages":
                fail(f"{where}: unknown key {str(key)!r}{closest(str(key), ['stages'])}; allowed: stages")
        data = data.get("stages")
    if not isinstance(data, list) or not data:
        fail(f"{where}: a recipe is a non-empty list of stages like '- gptq: {{wbits: 4}}'")
    for i, item in enumerate(data):
        item = {item: {}} if isinstance(item, str) else item
        if not isinstance(item, dict) or len(item) != 1:
            fail(f"{where}: stage {i} must be a one-key mapping 'method: {{options}}', got {_short(item)}")
        ((method, options),) = item.items()
        check_method_name(f"{where} stage {i}", method)
        if options is not None and not isinstance(options, dict):
            fail(f"{where} stage {i} ({method}): options must be a mapping like {{wbits: 4}}, got {_short(options)}")
        check_keys(_methods().get(method).Config, options or {}, f"{where} stage {i} ({method})")
    rec = recipe_from_dict(data, where)
    check_recipe(rec, where)
    return rec


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_max_memory(option: str, value: Any) -> None:
    from .memory import parse_max_memory

    if value is not None:
        parse_max_memory(str(value))  # its message names the option and the part it could not read


def _rule(rule: Callable[..., Any], option: str, value: Any, *limits: Any) -> None:
    """A rule of config.py, its message naming the option."""
    try:
        rule(value, option, *limits)
    except ValueError as err:
        fail(str(err))


def check_group_size(option: str, value: Any) -> None:
    _rule(group_size_rule, option, value)


def check_recipe(rec: Recipe, where: str = "recipe") -> None:
    """What no single stage config can see: the order of the stages (a stack a method refuses).
    Every number, format and regex of a stage is its config's own rule (methods/*.py, config.py)."""
    if (problem := rec.stack_problem()) is not None:
        fail(f"{where}: {problem}")


def check_recipe_file(path: Any, option: str = "--recipe") -> Recipe:
    return check_recipe_data(read_yaml(option, path), str(path))


# ---------------------------------------------------------------- studies


def check_study_data(data: Any, where: str, data_dir: Any = None, stem: str = "study") -> StudySpec:
    """Raw study data -> StudySpec, every axis checked (names, ranges, sources, their size)."""
    from .studies.spec import StudySpec, method_recipes

    if not isinstance(data, dict):
        fail(f"{where}: a study is a mapping with name, models, methods, calibration, evaluation; got {_short(data)}")
    data = dict(data)
    data.setdefault("name", stem)
    check_keys(StudySpec, data, where)
    methods = data.get("methods")
    for i, m in enumerate(methods if isinstance(methods, list) else []):
        if isinstance(m, dict) and isinstance(m.get("method"), str):
            check_method_name(f"{where} methods[{i}]", m["method"])
            if isinstance(m.get("options"), dict):
                check_keys(_methods().get(m["method"]).Config, m["options"], f"{where} methods[{i}] options")
        if isinstance(m, dict) and isinstance(m.get("recipe"), list):
            check_recipe_data(m["recipe"], f"{where} methods[{i}] recipe")
    for key in ("models", "methods"):
        if key in data and not isinstance(data[key], list):
            fail(
                f"{where}: {key} must be a list like [{'smollm2-135m' if key == 'models' else '{method: gptq}'}], "
                f"got {_short(data[key])}"
            )
    spec = _parse(StudySpec, data, where)
    for i, model in enumerate(spec.models):
        check_model_name(f"{where} models[{i}]", model.name)
        check_dtype(f"{where} models[{i}] dtype", model.dtype)
    for i, axis in enumerate(spec.methods):
        at = f"{where} methods[{i}]"
        for _label, _bits, rec in method_recipes(axis, at):
            check_recipe(rec, at)
    cal, ev, diag = spec.calibration, spec.evaluation, spec.diagnostics
    for src in cal.sources:
        check_source(f"{where} calibration source", src, data_dir)
    for src in ev.ppl:
        check_source(f"{where} evaluation ppl source", src, data_dir, union=False)
    if ev.suite is not None:
        check_suite(f"{where} evaluation suite", ev.suite, data_dir)
    for t in ev.tasks:
        check_task(f"{where} evaluation tasks", t, data_dir)
    check_device(f"{where} device", spec.device)
    for m in spec.models:
        check_context(f"{where} calibration seqlen", cal.seqlen, m.name)
        check_context(f"{where} evaluation ppl_seqlen", ev.ppl_seqlen, m.name)
        check_context(f"{where} diagnostics seqlen", diag.seqlen, m.name)
    needs_cal = any(r.needs_calibration for a in spec.methods for _, _, r in method_recipes(a, where))
    for src in cal.sources if needs_cal else []:
        if cal.mode == "examples":
            check_calib_examples(f"{where} calibration source", src, cal.n)
            continue
        for m in spec.models:
            check_calib_budget(f"{where} calibration source", src, cal.n, cal.seqlen, m.name)
    from .studies.spec import expand

    expand(spec, str(data_dir) if data_dir else None)  # duplicate cells, sources as the runner sees them
    return spec


def _parse(model: Any, data: Any, where: str) -> Any:
    """config.parse, with the errors a `mode="before"` validator lets through (it sees raw
    values of any type) turned into one line too."""
    from .config import parse

    try:
        return parse(model, data, where)
    except InvalidInput:
        raise
    except ConfigError as err:  # a rule of the config types: rejected input like any other
        fail(str(err))
    except (TypeError, AttributeError, KeyError) as err:
        fail(f"{where}: a value has the wrong type ({type(err).__name__}: {err})")


def check_study_file(path: Any, data_dir: Any = None, option: str = "STUDY") -> StudySpec:
    return check_study_data(read_yaml(option, path), str(path), data_dir, Path(str(path)).stem)


# ---------------------------------------------------------------- commands


def check_propagation(propagate: Any, activations: Any, stats_cache: Any) -> None:
    """--propagate, --activations and --stats-cache (the CLI and quantshift.quantize alike)."""
    from .quant.engine import ACTIVATION_MODES, PROPAGATE_MODES

    check_choice("--propagate", propagate, PROPAGATE_MODES)
    check_choice("--activations", activations, ACTIVATION_MODES)
    if stats_cache is not None and propagate != "fp":
        fail(
            "--stats-cache needs --propagate fp: with quantized propagation each block's inputs depend on "
            "the bit width and method, so its statistics cannot be reused"
        )


def check_quantize(o: dict) -> None:
    check_model_name("MODEL", o["model"])
    method, recipe = o.get("method"), o.get("recipe")
    if (method is None) == (recipe is None):
        fail("give exactly one of --method or --recipe")  # (a study's methods entry: studies/spec.py)
    fmt = {k: o.get(k) for k in ("wbits", "abits", "group_size", "sym")}
    if o.get("wbits") is not None:
        _rule(wbits_rule, "--wbits", o["wbits"])
    if o.get("abits") is not None:
        _rule(abits_rule, "--abits", o["abits"])
    if o.get("group_size") is not None:
        check_group_size("--group-size", o["group_size"])
    if recipe is not None:
        if any(v is not None for v in fmt.values()):
            fail("--wbits/--abits/--group-size/--sym go with --method; put them in the recipe file instead")
        rec = check_recipe_file(recipe)
    else:
        rec = _cli_recipe(str(method), fmt)
    int_in("--nsamples", o["nsamples"], 1, MAX_COUNT)
    int_in("--seqlen", o["seqlen"], 2, MAX_SEQLEN)
    check_seed("--seed", o["seed"])
    int_in("--batch-size", o["batch_size"], 1, MAX_BATCH)
    check_device("--device", o["device"])
    check_dtype("--dtype", o["dtype"])
    check_propagation(o["propagate"], o["activations"], o.get("stats_cache"))
    if o.get("data_dir") is not None:
        check_existing_dir("--data-dir", o["data_dir"])
    if o.get("stats_cache") is not None:
        if Path(str(o["stats_cache"])).exists() and not Path(str(o["stats_cache"])).is_dir():
            fail(f"--stats-cache {str(o['stats_cache'])!r} is a file, not a directory")
    calib = o["calib"]
    check_source("--calib", calib, o.get("data_dir"))
    check_out_dir("--out", o["out"], bool(o.get("overwrite")))
    check_max_memory("--max-memory", o.get("max_memory"))
    if o.get("dtype") is not None:
        check_dtype("--dtype", o["dtype"])
    check_context("--seqlen", o["seqlen"], str(o["model"]))
    if rec.needs_calibration:
        check_calib_budget("--calib", calib, o["nsamples"], o["seqlen"], str(o["model"]))
    if (
        o.get("max_memory") is not None and local_model_dir(str(o["model"])) is not None
    ):  # a plan over the cap: exit 2 now
        from .memory import plan_for_model
        from .models.load import resolve_device

        parts = len(str(calib).split("+"))
        plan_for_model(
            str(o["model"]),
            device=resolve_device(o["device"]),
            dtype=o["dtype"],
            max_memory=o["max_memory"],
            calib_tokens=o["nsamples"] * o["seqlen"] * parts if rec.needs_calibration else 0,
            calibrated=rec.needs_calibration,
            evaluate=False,
        )


def _cli_recipe(method: str, fmt: dict) -> Recipe:
    from .recipes import recipe_from_cli

    if "+" in method:
        fail(f"--method {method!r}: stacks are a comma list (--method smoothquant,gptq) or a YAML --recipe")
    names = split_list(method)
    if not names:
        fail(f"--method must name a method, got {method!r}; allowed: {', '.join(_methods().names())}")
    for name in names:
        check_method_name("--method", name)
    # a method's own limits (QuIP's bits, fp8's 8 bits, SpQR's groups) are its Config's validators
    try:
        rec = recipe_from_cli(method, **fmt)
    except ConfigError as err:
        fail(f"--method {method}: {err}")
    check_recipe(rec, f"--method {method}")
    return rec


def check_eval(o: dict) -> None:
    check_model_name("MODEL", o["model"])
    check_choice("--backend", o["backend"], ("fake", "packed"))
    check_choice("--head", o["head"], ("float", "int8"))
    check_choice("--chat-template", o["chat_template"], ("off", "auto", "on"))
    if o["head"] != "float" and o["backend"] != "packed":
        fail("--head int8 needs --backend packed")
    data_dir = o.get("data_dir")
    if data_dir is not None:
        check_existing_dir("--data-dir", data_dir)
    ppl, tasks, suite = split_list(o.get("ppl")), split_list(o.get("tasks")), o.get("suite")
    if not ppl and not tasks and not suite and o.get("mt_bench") is None:
        fail("nothing to evaluate: give --ppl SOURCES, --tasks NAMES, --suite NAME or --mt-bench FILE")
    for src in ppl:
        check_source("--ppl", src, data_dir, union=False)
    for t in tasks:
        check_task("--tasks", t, data_dir)
    if suite is not None:
        check_suite("--suite", suite, data_dir)
    if o.get("shots") is not None:
        int_list("--shots", o["shots"], 0, MAX_SHOTS)
    if o.get("limit") is not None:
        int_in("--limit", o["limit"], 0, MAX_COUNT, " (0 = all)")
    int_in("--seqlen", o["seqlen"], 2, MAX_SEQLEN)
    if ppl or suite:
        check_context("--seqlen", o["seqlen"], str(o["model"]))
    int_in("--max-windows", o["max_windows"], 0, MAX_COUNT, " (0 = all)")
    int_in("--batch-size", o["batch_size"], 1, MAX_BATCH)
    check_seed("--seed", o["seed"])
    check_device("--device", o["device"])
    check_dtype("--dtype", o["dtype"])
    int_in("--max-new-tokens", o["max_new_tokens"], 1, MAX_SEQLEN)
    if (o.get("mt_bench") is None) != (o.get("judge") is None):
        fail("--mt-bench QUESTIONS.jsonl and --judge SPEC go together")
    if o.get("mt_bench") is not None:
        check_existing_file("--mt-bench", o["mt_bench"])
        from .evaluation.judge import check_judge_spec

        check_judge_spec(str(o["judge"]))
    if o.get("json_out") is not None:
        check_out_file("--json", o["json_out"])
    check_max_memory("--max-memory", o.get("max_memory"))
    if o.get("max_memory") is not None and local_model_dir(str(o["model"])) is not None:
        from .memory import plan_for_model
        from .models.load import resolve_device

        plan_for_model(
            str(o["model"]),
            device=resolve_device(o["device"]),
            dtype=o["dtype"],
            max_memory=o["max_memory"],
            quantize=False,
            batch_size=o["batch_size"],
            seqlen=o["seqlen"],
            max_windows=o["max_windows"],
            backend=o["backend"],
        )


def check_export(o: dict) -> None:
    from .checkpoint import QUANT_FILE
    from .exporters import FORMATS
    from .exporters.common import DTYPES as EXPORT_DTYPES

    src = user_path(str(o["src"]))
    if not src.is_dir():
        fail(f"SRC {str(o['src'])!r}: no such directory (give a directory written by `quantshift quantize`)")
    if not (src / QUANT_FILE).is_file():
        fail(f"SRC {str(o['src'])!r} is not a quantshift quantized directory (no {QUANT_FILE}); quantize it first")
    if o.get("fmt") not in FORMATS:
        unknown("export format", o.get("fmt"), FORMATS, where="--format")
    dtype = o["dtype"]
    if dtype != "auto" and dtype not in EXPORT_DTYPES:
        unknown("dtype", dtype, ["auto", *EXPORT_DTYPES], where="--dtype")
    if o["gptq_version"] not in (1, 2):
        fail(f"--gptq-version must be 1 (gptq) or 2 (gptq_v2), got {o.get('gptq_version')!r}")
    check_out_dir("--out", o["out"], bool(o.get("overwrite")))
    if user_path(str(o["out"])).absolute() == src.absolute():
        fail("--out must differ from SRC: the export would replace its own input")


def check_bench(o: dict) -> None:
    check_model_name("MODEL", o["model"])
    for opt, key in (
        ("--batch-sizes", "batch_sizes"),
        ("--prefill-batches", "prefill_batches"),
        ("--decode-batches", "decode_batches"),
    ):
        if o[key] is not None:
            int_list(opt, str(o[key]), 1, MAX_BATCH)
    int_in("--prompt-len", o["prompt_len"], 1, MAX_SEQLEN)
    int_in("--decode-prompt-len", o["decode_prompt_len"], 1, MAX_SEQLEN)
    int_in("--gen-len", o["gen_len"], 2, MAX_SEQLEN)
    int_in("--repeats", o["repeats"], 1, MAX_COUNT)
    int_in("--copy-mib", o["copy_mib"], 1, 1 << 16)
    if o.get("backend") is not None:
        check_choice("--backend", o["backend"], ("fake", "packed"))
    check_choice("--cache", o["cache"], ("static", "dynamic"))
    check_context("--prompt-len", o["prompt_len"], str(o["model"]))
    check_context("--decode-prompt-len + --gen-len", o["decode_prompt_len"] + o["gen_len"], str(o["model"]))
    check_device("--device", o["device"])
    if o.get("json_out") is not None:
        check_out_file("--json", o["json_out"])


def check_run(o: dict) -> None:
    data_dir = o.get("data_dir")
    if data_dir is not None:
        check_existing_dir("--data-dir", data_dir)
    executor = o["executor"]
    check_choice("--executor", executor, ("local", "ray"))
    int_in("--jobs", o["jobs"], 1, 4096)
    if o["jobs"] > 1 and executor != "local":
        fail(f"--jobs applies to the local executor; the {executor} executor schedules works itself")
    if o.get("ray_address") is not None and executor != "ray":
        fail("--ray-address goes with --executor ray")
    if o.get("gpus_per_cell") is not None:
        finite_in("--gpus-per-cell", o["gpus_per_cell"], 0.0, 1024.0)
        if o["gpus_per_cell"] > 1 and o["gpus_per_cell"] != int(o["gpus_per_cell"]):
            fail(f"--gpus-per-cell takes fractions below 1 or whole numbers, got {o['gpus_per_cell']!r}")
    for opt, key in (
        ("--cpus-per-cell", "cpus_per_cell"),
        ("--max-retries", "max_retries"),
        ("--lock-timeout", "lock_timeout"),
    ):
        if o.get(key) is not None and executor != "ray":
            fail(f"{opt} goes with --executor ray")
    if o.get("cpus_per_cell") is not None:
        finite_in("--cpus-per-cell", o["cpus_per_cell"], 0.0, 4096.0, lo_open=True)
    if o.get("max_retries") is not None:
        int_in("--max-retries", o["max_retries"], 0, 100)
    if o.get("lock_timeout") is not None:
        finite_in("--lock-timeout", o["lock_timeout"], 0.0, 86400.0, lo_open=True)
    check_max_memory("--max-memory", o.get("max_memory"))
    if o.get("device") is not None:
        check_device("--device", o["device"])
    for opt, key in (("--out", "out"), ("--cache", "cache")):
        p = o.get(key)
        if p is not None and user_path(str(p)).exists() and not user_path(str(p)).is_dir():
            fail(f"{opt} {str(p)!r} is an existing file, not a directory")
    check_study_file(o["study"], data_dir)


COMMANDS: dict[str, Callable[[dict], None]] = {
    "quantize": check_quantize,
    "eval": check_eval,
    "export": check_export,
    "bench": check_bench,
    "run": check_run,
}


def command(name: str, options: dict[str, Any]) -> None:
    """Check a command's options (the command body's `locals()`: every option present, with the
    defaults its signature states) before it does anything."""
    COMMANDS[name](options)


def forwarded(options: dict[str, Any], names: str) -> dict[str, Any]:
    """The command options (its `locals()`) that the API takes under the same names, space-separated:
    the commands and the API name their options alike, so they pass through unrenamed."""
    return {n: options[n] for n in names.split()}
