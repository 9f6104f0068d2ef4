"""Study specs: a YAML grid (models x recipes x calibration sets x evaluation x seeds) expanded into cells.

    name: offline-cross-domain
    models: [smollm2-135m]
    methods:
      - {method: gptq, wbits: [4, 3], group_size: 64}
      - {name: sq-gptq, recipe: [{smoothquant: {alpha: 0.8}}, {gptq: {wbits: 4, abits: 8}}]}
    calibration: {sources: [wikipedia, pydocs], n: 16, seqlen: 256, mode: tokens, seeds: [42]}
    evaluation: {ppl: [wikipedia, pydocs], ppl_windows: 4, suite: offline, shots: [0], limit: 40}

Every mapping is strict: an unknown key is an error naming the key and the allowed ones.
A cell is one (model, recipe, calibration set) triple; recipes that need no calibration (RTN,
the fp reference) get one cell with no calibration set, which the runner's cache shares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator, model_validator

from ..config import (
    KEEP_BITS,
    MAX_BATCH,
    MAX_COUNT,
    MAX_SEQLEN,
    MAX_SHOTS,
    StrictModel,
    group_size_rule,
    integer_in,
    load_yaml,
    non_empty,
    parse,
    seed_rule,
)
from ..errors import ConfigError
from ..recipes import Recipe, recipe_from_dict

if TYPE_CHECKING:
    from ..data.sources import TextSource


class ModelAxis(StrictModel):
    name: str  # bundled alias, local directory or hub id
    dtype: str = "auto"
    label: str | None = None

    @property
    def display(self) -> str:
        return self.label or Path(self.name).name or self.name


def precision_of(model: ModelAxis, versions: dict) -> str:
    """The name of the precision a model axis computes in under this plan."""
    from ..models.precision import resolve_precision

    device = "cuda" if versions.get("device") == "cuda" else "cpu"
    if model.dtype == "auto":  # a plan records what auto meant; older plans did not
        return versions.get("precision_auto") or resolve_precision("auto", device).name
    return resolve_precision(model.dtype, device).name


class MethodAxis(StrictModel):
    """Either a method with a list of weight bit widths, or a full recipe (ordered stages)."""

    method: str | None = None
    wbits: list[int] = [4]
    abits: int = KEEP_BITS
    group_size: int | None = 128  # None: the method's own default (e.g. SpQR's 16)
    sym: bool = False
    options: dict[str, Any] = {}  # further method options (e.g. damp for gptq)
    recipe: list[Any] | None = None  # full stage list, as in a recipe file
    name: str | None = None  # label in reports (default: method + format)
    # only for these models (names or labels as in `models:`); None = every model. Iso-memory
    # studies quantize a larger model to fewer bits than a smaller one
    models: list[str] | None = None

    @field_validator("wbits", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        return v if v is None else group_size_rule(v)

    @model_validator(mode="after")
    def _one_form(self) -> MethodAxis:
        if self.method is not None and not self.wbits:
            raise ValueError("wbits is empty; give one or more bit widths")
        if (self.method is None) == (self.recipe is None):
            raise ValueError("give exactly one of 'method' (with wbits/abits/group_size) or 'recipe' (a stage list)")
        if self.recipe is not None and self.name is None:
            raise ValueError("a 'recipe' entry needs a 'name' for the report")
        return self


class CalibrationAxis(StrictModel):
    sources: list[str] = ["wikipedia"]
    n: int = 128
    seqlen: int = 512
    # tokens: n windows of seqlen tokens from each source's joined text (same token budget for
    # every source); examples: n documents/items (each cut to seqlen tokens) packed into windows,
    # as the paper's protocol (128 samples); the token count then differs by source and is recorded
    mode: Literal["tokens", "examples"] = "tokens"
    order: Literal["random", "first"] = "random"  # examples mode: seeded sample or the first n
    seeds: list[int] = [42]
    # quantized: calibrate each block on the quantized model's activations (GPTQ's way); fp: on
    # the fp model's, so GPTQ-family Hessians are cached per calibration set in the study cache
    # and reused by every bit width / option and by unions of sources ("a+b")
    propagate: Literal["quantized", "fp"] = "quantized"
    # task sources (task:<name>): each item in the task's prompt template with its answer, or
    # the prompt alone (answers: false)
    answers: bool = True

    _n = field_validator("n")(integer_in(1, MAX_COUNT))
    _seqlen = field_validator("seqlen")(integer_in(2, MAX_SEQLEN))
    _given = field_validator("sources", "seeds")(non_empty)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return [seed_rule(s, "seeds") for s in v]


class EvaluationAxis(StrictModel):
    ppl: list[str] = []
    ppl_seqlen: int = 512
    ppl_windows: int = 16
    suite: str | None = None
    tasks: list[str] = []
    shots: list[int] = [0]
    limit: int | None = None  # items per task (None = all)
    batch_size: int = 4
    bench: bool = False  # each kept quantized model: bench.measure.study_bench (packed kernels, small sizes)
    # task prompts through the tokenizer's chat template (evaluation.run.use_chat_template)
    chat_template: Literal["off", "auto", "on"] = "off"
    # the unquantized models also run every task with the template off, for the report's paired
    # template on-vs-off comparison (chat_template_units)
    chat_template_ablation: bool = False

    _ppl_seqlen = field_validator("ppl_seqlen")(integer_in(2, MAX_SEQLEN))
    _counts = field_validator("ppl_windows", "limit")(integer_in(0, MAX_COUNT, " (0 = all)"))
    _shots = field_validator("shots")(integer_in(0, MAX_SHOTS))
    _shots_given = field_validator("shots")(non_empty)
    _batch_size = field_validator("batch_size")(integer_in(1, MAX_BATCH))

    @model_validator(mode="after")
    def _ablation_needs_template(self) -> EvaluationAxis:
        if self.chat_template_ablation and self.chat_template == "off":
            raise ValueError(
                "chat_template_ablation compares the template on with off: set chat_template to auto or on"
            )
        return self


class DiagnosticsAxis(StrictModel):
    enabled: bool = True
    windows: int = 2  # windows per set for the fp-model statistics
    seqlen: int = 256

    _windows = field_validator("windows")(integer_in(1, MAX_COUNT))
    _seqlen = field_validator("seqlen")(integer_in(2, MAX_SEQLEN))


class StudySpec(StrictModel):
    name: str
    description: str = ""
    paper: str = ""  # how the preset maps to the paper's protocol
    models: list[ModelAxis]
    methods: list[MethodAxis]
    calibration: CalibrationAxis = CalibrationAxis()
    evaluation: EvaluationAxis = EvaluationAxis()
    diagnostics: DiagnosticsAxis = DiagnosticsAxis()
    include_fp: bool = True  # evaluate the unquantized model once per model
    keep_models: bool = False  # keep quantized model dirs in the cache (~size of the fp model each)
    device: str = "auto"
    batch_size: int = 8  # calibration batch size

    _batch_size = field_validator("batch_size")(integer_in(1, MAX_BATCH))

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in (v or [])]

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v.strip() or v in (".", "..") or any(c in v for c in "/\\\0"):
            raise ValueError(f"name {v!r} must be a plain directory name (the run goes to runs/<name>)")
        return v

    @field_validator("models")
    @classmethod
    def _some_model(cls, v: list[ModelAxis]) -> list[ModelAxis]:
        if not v:
            raise ValueError("models is empty; give at least one model")
        return v

    @model_validator(mode="after")
    def _something_to_run(self) -> StudySpec:
        if not self.methods and not self.include_fp:
            raise ValueError("no methods and include_fp is false: nothing to run")
        ev = self.evaluation  # (checked here: an omitted evaluation is its empty default)
        if not ev.ppl and not ev.tasks and not ev.suite:
            raise ValueError("evaluation: nothing to evaluate; give ppl sources, tasks or a suite")
        return self

    @model_validator(mode="after")
    def _bench_needs_kept_models(self) -> StudySpec:
        if self.evaluation.bench and not self.keep_models:
            raise ValueError("evaluation.bench needs keep_models: true (it benches the kept directories)")
        return self


@dataclass(frozen=True)
class CalibChoice:
    source: str
    n: int
    seqlen: int
    seed: int
    mode: str
    order: str
    propagate: str = "quantized"
    answers: bool = True

    def to_dict(self) -> dict:
        d: dict = {
            "source": self.source,
            "n": self.n,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "mode": self.mode,
            "order": self.order,
        }
        # non-default options only: existing cache keys stay valid
        if self.propagate != "quantized":
            d["propagate"] = self.propagate
        if not self.answers:
            d["answers"] = False
        return d


RAW_SUFFIX = "/raw"  # a raw-prompt twin's key: its templated unit's key + this


@dataclass(frozen=True)
class EvalUnit:
    """One cacheable evaluation: perplexity on a source, or one task at a shot count."""

    kind: str  # "ppl" | "task"
    name: str
    shots: int = 0
    raw: bool = False  # the chat-template ablation: prompts without the template whatever the study sets
    # the suite's label for the task (its `categories`), which outranks the task's own; not part of the key
    category: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        if self.kind == "ppl":
            return f"ppl:{self.name}"
        return f"task:{self.name}@{self.shots}" + (RAW_SUFFIX if self.raw else "")


@dataclass(frozen=True)
class Cell:
    model: ModelAxis
    method: str  # label for reports, e.g. "gptq" or a recipe entry's name
    wbits: int  # KEEP_BITS (16) for the fp reference
    recipe: Recipe | None  # None = the unquantized model
    calib: CalibChoice | None

    @property
    def label(self) -> str:
        c = f"{short_source(self.calib.source)}/s{self.calib.seed}" if self.calib else "-"
        return f"{self.model.display}/{self.method}-w{self.wbits}/{c}"

    def to_dict(self) -> dict:
        return {
            "model": self.model.model_dump(),
            "method": self.method,
            "wbits": self.wbits,
            "recipe": self.recipe.to_dict() if self.recipe else None,
            "calib": self.calib.to_dict() if self.calib else None,
            "label": self.label,
        }


def short_source(name: str) -> str:
    """Display name of a source: a local file by its stem, registered names as they are,
    a union part by part."""
    if "+" in name:
        return "+".join(short_source(p) for p in name.split("+"))
    if name.endswith((".txt", ".jsonl")) and "/" in name:
        return Path(name).stem
    return name


def load_study(path: str | Path) -> StudySpec:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study is a mapping with name, models, methods, calibration, evaluation")
    data.setdefault("name", Path(path).stem)
    return parse(StudySpec, data, str(path))


def study_from_dict(data: dict, where: str = "study") -> StudySpec:
    return parse(StudySpec, data, where)


def method_recipes(axis: MethodAxis, where: str) -> list[tuple[str, int, Recipe]]:
    """(label, wbits, recipe) for each bit width of a method entry, validated against the registry."""
    if axis.recipe is not None:
        rec = recipe_from_dict(axis.recipe, f"{where} recipe")
        # read back the way its workers will, so that a stage that does not survive its own dump
        # fails here (in check) and not mid-run
        recipe_from_dict(rec.to_dict()["stages"], f"{where} recipe (as its workers read it)")
        bits = min((s.config.wbits for s in rec.stages), default=KEEP_BITS)
        return [(axis.name or "", bits, rec)]
    from ..methods import METHODS

    if axis.method not in METHODS:
        raise ConfigError(
            f"{where}: method {axis.method!r} is not registered in this quantshift "
            f"(available: {', '.join(METHODS.names())})"
        )
    out = []
    for b in axis.wbits:
        opts = {"wbits": b, "abits": axis.abits, "sym": axis.sym, **axis.options}
        if axis.group_size is not None:
            opts["group_size"] = axis.group_size
        stage = {axis.method: opts}
        out.append((axis.name or axis.method or "", b, recipe_from_dict([stage], f"{where} (wbits {b})")))
    return out


def check_sources(spec: StudySpec, data_dir: str | None = None) -> None:
    """Every calibration and perplexity source must exist (task:<name> sources come from tasks)."""
    from ..data.calibset import split_union

    parts = [p for name in spec.calibration.sources for p in split_union(name)]
    for name in dict.fromkeys(parts + spec.evaluation.ppl):
        try:
            resolve_source(name, data_dir)
        except ConfigError as err:
            raise ConfigError(
                f"study {spec.name!r}: calibration/ppl source {name!r} is not available ({err})"
            ) from None


def resolve_source(name: str, data_dir: str | None = None, answers: bool = True) -> TextSource:
    """A text source by name; `task:<pattern>` sources read data-dir tasks from `data_dir`."""
    from ..data.sources import get_source

    return get_source(name, data_dir, answers)


def task_names(spec: StudySpec) -> list[str]:
    """The tasks to evaluate: the suite's tasks, then explicit ones (order kept, duplicates dropped)."""
    names: list[str] = []
    if spec.evaluation.suite:
        names += suite_tasks(spec.evaluation.suite)
    names += spec.evaluation.tasks
    return list(dict.fromkeys(names))


def suite_tasks(suite: str) -> list[str]:
    from ..evaluation.tasks import SUITES

    item = SUITES.get(suite)
    tasks: list = getattr(item, "tasks", item)  # type: ignore[arg-type]  # a SuiteDef or a plain list
    return [t if isinstance(t, str) else t.name for t in tasks]


def eval_units(spec: StudySpec) -> list[EvalUnit]:
    """Perplexity per source; each task at every study shot count, and at its own count where it
    has one (BOSS's per-task counts: evaluation.tasks.fixed_shots) that the study does not list."""
    from ..evaluation.tasks import fixed_shots

    units = [EvalUnit("ppl", s) for s in spec.evaluation.ppl]
    tasks = task_names(spec)
    label = suite_categories(spec.evaluation.suite)
    for shots in spec.evaluation.shots:
        units += [EvalUnit("task", t, shots, category=label.get(t, "")) for t in tasks]
    for t in tasks:
        own = fixed_shots(t, spec.evaluation.suite)
        if own is not None and own not in spec.evaluation.shots:
            units.append(EvalUnit("task", t, own, category=label.get(t, "")))
    return units


def suite_categories(suite: str | None) -> dict[str, str]:
    """Task -> the suite's category for it (a suite's `categories` relabel tasks it borrows, e.g.
    mmlu_dev as knowledge_language in instruct-local); empty without a suite or categories."""
    from ..evaluation.tasks import SUITES

    item = SUITES.get(suite) if suite else None
    cats: dict = getattr(item, "categories", None) or {}
    return {str(t): str(c) for c, names in cats.items() for t in names}


def chat_template_units(spec: StudySpec) -> list[EvalUnit]:
    """The unquantized models' extra units when the study asks for the chat-template ablation:
    every task unit again with raw prompts (paired with its templated twin in the report)."""
    if not spec.evaluation.chat_template_ablation:
        return []
    return [
        EvalUnit("task", u.name, u.shots, raw=True, category=u.category) for u in eval_units(spec) if u.kind == "task"
    ]


def unit_shots(units: list[EvalUnit]) -> list[int]:
    """The shot counts the task units use, in increasing order."""
    return sorted({u.shots for u in units if u.kind == "task"})


def expand(spec: StudySpec, data_dir: str | None = None) -> list[Cell]:
    """The grid, in a fixed order: per model, the fp reference, then each method x bits x calib x seed."""
    check_sources(spec, data_dir)
    recipes = []
    known = {n for m in spec.models for n in (m.name, m.display)}
    for i, axis in enumerate(spec.methods):
        unknown = [m for m in axis.models or [] if m not in known]
        if unknown:
            raise ConfigError(
                f"study {spec.name!r} methods[{i}].models: {unknown[0]!r} is not one of the study's models "
                f"({', '.join(sorted(known))})"
            )
        recipes += [(axis.models, *r) for r in method_recipes(axis, f"study {spec.name!r} methods[{i}]")]
    cal = spec.calibration
    cells: list[Cell] = []
    for model in spec.models:
        if spec.include_fp:
            cells.append(Cell(model, "fp", 16, None, None))
        for only, label, bits, rec in recipes:
            if only is not None and model.name not in only and model.display not in only:
                continue
            if not rec.needs_calibration:
                cells.append(Cell(model, label, bits, rec, None))
                continue
            for seed in cal.seeds:
                for src in cal.sources:
                    cells.append(
                        Cell(
                            model,
                            label,
                            bits,
                            rec,
                            CalibChoice(src, cal.n, cal.seqlen, seed, cal.mode, cal.order, cal.propagate, cal.answers),
                        )
                    )
    labels = [c.label for c in cells]
    dup = next((lab for lab in labels if labels.count(lab) > 1), None)
    if dup:
        raise ConfigError(f"study {spec.name!r}: two cells are both {dup!r}; give the method entries distinct 'name's")
    return cells


def digest(obj: Any, n: int = 20) -> str:
    """Content hash of a JSON-able object (sorted keys): the cache's addressing function."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
