"""The plain-JSON records a study passes around: works (what to run), their evaluation units, and
what a work reports back, and the collected results the report reads. TypedDicts, not classes: executors ship works to other processes and Ray
workers as they are, and cache keys are digests of the same plain values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypedDict

if TYPE_CHECKING:  # spec imports nothing from here; at run time the records stay plain dicts
    from .spec import EvalUnit, StudySpec


class UnitRecord(TypedDict):
    """One evaluation a model work owes: perplexity on a source, or one task at a shot count."""

    kind: str  # "ppl" | "task"
    name: str
    shots: int
    key: str  # its result's cache key
    settings: dict  # keys.unit_settings: what the evaluation is run with


class WorkMemory(TypedDict, total=False):
    """A model work's memory plan, added by runner.plan_work_memory when the study runs."""

    memory_bytes: int  # estimated peak host bytes
    memory_error: str  # why it cannot fit the memory cap, when it cannot


class ModelWork(WorkMemory):
    """One model to produce (fp when recipe is None) and the units it owes."""

    kind: Literal["model"]
    key: str  # keys.quant_key
    label: str
    model: dict  # ModelAxis.model_dump()
    precision: str
    recipe: dict | None
    calib: dict | None  # CalibChoice.to_dict(); None when the recipe needs no calibration
    calib_key: str | None
    units: list[UnitRecord]


class DiagWork(TypedDict):
    """The fp model's statistics on every calibration and test set (diagnostics.py)."""

    kind: Literal["diag"]
    key: str
    label: str
    model: dict
    sets: list[dict]
    settings: dict


Work = ModelWork | DiagWork


class WorkResult(TypedDict, total=False):
    """What executing a work reports (execute_work, or an executor for a work that never reported)."""

    key: str
    label: str
    ok: bool
    computed: list[str]  # result keys written by this run
    seconds: float
    error: str
    traceback: str
    diag: list[str]  # diagnostic sets computed (diag works)
    wrote: list[str]  # cache entries this process wrote (none: another process had done the work)
    deferred: bool  # a Ray task gave up waiting for the work's lock: queue it again


class CellResult(TypedDict, total=False):
    """One cell of a study with everything the cache holds for it (runner.collect): the report's input."""

    label: str
    model: dict  # ModelAxis.model_dump()
    method: str
    wbits: int
    recipe: dict | None  # None: the unquantized model
    calib: dict | None  # CalibChoice.to_dict(); None: a calibration-free cell
    key: str  # its model's quant key
    status: str  # "done" | "failed" | "pending"
    metrics: dict[str, dict]  # unit key -> the unit's metric record
    samples: dict[str, list[dict]]  # unit key -> per-item (per-window) scores
    error: str | None
    calib_manifest: dict | None
    quant_seconds: float | None
    numerics: dict | None
    packed_bytes: int | None
    weight_formats: dict | None
    bench: dict | None
    eval_seconds: float


class StudyResults(TypedDict, total=False):
    """Everything the report needs, read back from the cache (runner.collect)."""

    spec: StudySpec
    units: list[EvalUnit]
    cells: list[CellResult]
    diagnostics: dict[str, dict]  # model -> (calibration source, seed, test) -> statistics
    diag_errors: dict[str, str]
    versions: dict[str, str]
