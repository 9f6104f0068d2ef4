"""Plan a study into works, run each work through the cache, gather results.

A *work* is one model to produce (fp, or quantized with a recipe on a calibration set) and the
evaluation units it still owes. Cells that produce the same model (RTN under any calibration
source, the same recipe listed twice) share one work because they share its cache key. Executing
a work is work.py's job; the executors (executors.py) decide where works run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import Cache
from .diagnostics import all_pairs, diag_work
from .keys import calib_key, code_versions, quant_key, unit_key, unit_settings
from .records import CellResult, ModelWork, StudyResults, Work, WorkResult
from .spec import Cell, EvalUnit, StudySpec, chat_template_units, eval_units, expand, precision_of
from .work import has_quant_record, pending_units

if TYPE_CHECKING:
    from .executors import RayCluster


@dataclass
class Plan:
    spec: StudySpec
    cells: list[Cell]
    cell_keys: list[str]  # quant key of each cell
    works: list[ModelWork]  # unique by quant key, in cell order
    units: list[EvalUnit]
    unit_keys: dict[str, dict[str, str]]  # quant key -> unit.key -> result key
    versions: dict = field(default_factory=dict)
    fp_units: list[EvalUnit] = field(default_factory=list)  # the unquantized models' extra units

    def units_of(self, cell: Cell) -> list[EvalUnit]:
        return owed_units(cell, self.units, self.fp_units)


def owed_units(cell: Cell, units: list[EvalUnit], fp_units: list[EvalUnit]) -> list[EvalUnit]:
    """The evaluation units a cell owes: every study unit, and the fp-only ones for the unquantized model."""
    return units + (fp_units if cell.recipe is None else [])


def plan_study(
    spec: StudySpec, data_dir: str | None = None, on_gpu: bool | None = None, precision_auto: str | None = None
) -> Plan:
    """precision_auto: what --dtype auto resolved to when the study ran (report_only passes the
    recorded one; by default it is resolved on this machine)."""
    from ..models.precision import resolve_precision

    versions = code_versions()
    if on_gpu is None:
        from ..models.load import resolve_device

        on_gpu = resolve_device(spec.device).startswith("cuda")
    if on_gpu:  # GPU kernels and fp16 give other numbers than CPU fp32: never share their cache entries
        versions["device"] = "cuda"
    # "auto" is bf16 autocast on a CPU with bf16 units and float32 on one without: every key
    # carries what it resolved to, so the two never share results
    versions["precision_auto"] = precision_auto or resolve_precision("auto", "cuda" if on_gpu else "cpu").name
    cells = expand(spec, data_dir)
    units = eval_units(spec)
    fp_units = chat_template_units(spec)
    works: dict[str, ModelWork] = {}
    keys: list[str] = []
    ukeys: dict[str, dict[str, str]] = {}
    for cell in cells:
        qk = quant_key(cell, versions)
        keys.append(qk)
        if qk in works:
            continue
        owed = owed_units(cell, units, fp_units)
        ukeys[qk] = {u.key: unit_key(qk, unit_settings(spec, u), versions) for u in owed}
        calib = cell.calib if cell.recipe and cell.recipe.needs_calibration else None
        works[qk] = {
            "kind": "model",
            "key": qk,
            "label": cell.label,
            "model": cell.model.model_dump(),
            "precision": precision_of(cell.model, versions),
            "recipe": cell.recipe.to_dict() if cell.recipe else None,
            "calib": calib.to_dict() if calib else None,
            "calib_key": calib_key(cell.model, calib, versions) if calib else None,
            "units": [
                {
                    "kind": u.kind,
                    "name": u.name,
                    "shots": u.shots,
                    "key": ukeys[qk][u.key],
                    "settings": unit_settings(spec, u),
                }
                for u in owed
            ],
        }
    return Plan(spec, cells, keys, list(works.values()), units, ukeys, versions, fp_units)


def options_of(spec: StudySpec, data_dir: str | None, max_memory: str | None = None) -> dict:
    return {
        "device": spec.device,
        "batch_size": spec.batch_size,
        "eval_batch_size": spec.evaluation.batch_size,
        "keep_models": spec.keep_models,
        "data_dir": data_dir,
        "bench": spec.evaluation.bench,
        "max_memory": max_memory,
    }


def plan_work_memory(works: list[Work], options: dict) -> None:
    """Each model work's memory plan (memory.py): `memory_bytes`, its estimated peak host bytes,
    which the executors schedule by (two large models never run at once on one host; Ray asks
    for that much), or `memory_error` when even streaming does not fit the cap (the work then
    fails with that line instead of running out of memory an hour in)."""
    from ..errors import ConfigError, QuantshiftError
    from ..models.load import resolve_device
    from .spec import ModelAxis
    from .work import model_plan

    device = resolve_device(options["device"])
    for w in works:
        if w["kind"] != "model":
            continue
        try:
            plan = model_plan(ModelAxis(**w["model"]), w, options, device, quantize=w["recipe"] is not None)
        except ConfigError as err:  # over the cap even streaming
            w["memory_error"] = str(err)
            continue
        except QuantshiftError:  # the config cannot be read here: the work's own load says why
            continue
        w["memory_bytes"] = max(st.host for st in plan.stages)


# ---------------------------------------------------------------- running a study


def needs_work(work: Work, cache: Cache) -> bool:
    """Checks every entry, no short cut: planning is where a corrupt one is found and moved aside."""
    if work["kind"] == "diag":
        return not all([cache.has("diag", s["key"], ".pt") for s in work["sets"]])
    pending, recorded = pending_units(work, cache), has_quant_record(work, cache)
    return bool(pending) or not recorded


def all_works(plan: Plan) -> list[Work]:
    works: list[Work] = list(plan.works)
    for model in plan.spec.models:
        d = diag_work(plan.spec, model, plan.versions)
        if d is not None:
            # right after the model's fp reference: cheap, and a partial run already has them
            at = next(
                (
                    i + 1
                    for i, w in enumerate(works)
                    if w["kind"] == "model" and w["model"] == d["model"] and w["recipe"] is None
                ),
                len(works),
            )
            works.insert(at, d)
    return works


def fetch_task_downloads(spec: StudySpec) -> None:
    """Task data fetched once into the cache (BIG-bench) is obtained before anything runs: a study
    whose data cannot be had fails in seconds with the reason, not after its first quantization."""
    from ..evaluation.tasks import TASKS, task_data
    from .spec import task_names

    for name in task_names(spec):
        if name in TASKS and TASKS.get(name).needs == "download":
            task_data(name)


def run_study(
    spec: StudySpec,
    out_dir: Path,
    cache_root: Path,
    *,
    executor: str = "local",
    ray_address: str | None = None,
    gpus_per_cell: float | None = None,
    cpus_per_cell: float | None = None,
    max_retries: int | None = None,
    lock_timeout: float | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    echo: Callable[[str], object] = print,
    jobs: int = 1,
    max_memory: str | None = None,
) -> dict:
    """Run every missing piece of the study, then gather results and write the report.
    `jobs`: worker processes of the local executor (1: in this process). The Ray executor's
    requests (executors.RaySettings): `gpus_per_cell` (default: 1 when the cluster has GPUs),
    `cpus_per_cell`, `max_retries`, `lock_timeout`; with the local executor, `gpus_per_cell` > 0
    only plans for a GPU."""
    from ..errors import ConfigError
    from .executors import RaySettings, connect_ray

    if jobs < 1:
        raise ConfigError(f"jobs must be 1 or more, got {jobs}")
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; allowed: local, ray")
    if jobs > 1 and executor != "local":
        raise ConfigError(f"jobs applies to the local executor; the {executor} executor schedules works itself")
    ray_only = {"cpus_per_cell": cpus_per_cell, "max_retries": max_retries, "lock_timeout": lock_timeout}
    if executor != "ray" and any(v is not None for v in ray_only.values()):
        raise ConfigError(f"{', '.join(k for k, v in ray_only.items() if v is not None)} go with the ray executor")
    cluster = None
    if executor == "ray":
        defaults = RaySettings()
        settings = RaySettings(
            ray_address,
            gpus_per_cell,
            defaults.cpus_per_cell if cpus_per_cell is None else cpus_per_cell,
            defaults.max_retries if max_retries is None else max_retries,
            defaults.lock_timeout if lock_timeout is None else lock_timeout,
        )
        cluster = connect_ray(settings, spec.device)
        echo(cluster.describe())
    try:
        fetch_task_downloads(spec)
        return _run_planned(
            spec, out_dir, cache_root, executor, cluster, gpus_per_cell, data_dir, progress, echo, jobs, max_memory
        )
    finally:
        if cluster is not None:
            cluster.close()


def _run_planned(
    spec: StudySpec,
    out_dir: Path,
    cache_root: Path,
    executor: str,
    cluster: RayCluster | None,
    gpus_per_cell: float | None,
    data_dir: str | None,
    progress: bool,
    echo: Callable[[str], object],
    jobs: int,
    max_memory: str | None = None,
) -> dict:
    from tqdm.auto import tqdm

    from ..checkpoint import write_json_atomic
    from .executors import run_local, run_ray
    from .placement import planned_device_kind
    from .report import write_report

    t0, cpu0 = time.time(), _cpu_seconds()
    if cluster is not None:  # as a worker with a cell's resources sees it (the probe)
        plan = plan_study(spec, data_dir, on_gpu=cluster.gpus > 0, precision_auto=cluster.precision_auto)
    else:
        plan = plan_study(spec, data_dir, on_gpu=True if gpus_per_cell else None)
    works = all_works(plan)
    cache = Cache(Path(cache_root))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out_dir / "study.json",
        {
            "spec": spec.model_dump(mode="json"),
            "versions": plan.versions,
            "cache": str(Path(cache_root).resolve()),
            "data_dir": data_dir,
            "cells": [dict(c.to_dict(), key=k) for c, k in zip(plan.cells, plan.cell_keys)],
        },
    )
    todo = [w for w in works if needs_work(w, cache)]
    echo(
        f"study {spec.name}: {len(plan.cells)} cells -> {len(plan.works)} distinct models x {len(plan.units)} "
        f"evaluations; {len(works) - len(todo)} of {len(works)} works already cached, {len(todo)} to run "
        f"({executor}{f', {jobs} jobs' if jobs > 1 else ''})"
    )
    results: dict[str, WorkResult] = {}
    write_json_atomic(out_dir / "last-run.json", {"results": results})
    bar = tqdm(total=len(todo), desc="study", unit="work", disable=not progress or not todo, position=0)

    def on_done(res: WorkResult) -> None:
        results[res["key"]] = res
        status = "ok" if res["ok"] else f"FAILED ({res['error']})"
        bar.update(1)
        n = len(results)
        what = f"{len(res['diag'])} diagnostic sets" if "diag" in res else f"{len(res['computed'])} results"
        elsewhere = ", already done by another process" if res["ok"] and not res.get("wrote", True) else ""
        tqdm.write(f"  [{n}/{len(todo)}] {res['label']}: {status}, {what} computed in {res['seconds']:.1f}s{elsewhere}")
        write_json_atomic(out_dir / "last-run.json", {"results": results})

    # every work checks on its worker that it computes on the device kind its keys were planned for
    options = {**options_of(spec, data_dir, max_memory), "planned_device": planned_device_kind(plan.versions)}
    plan_work_memory(todo, options)
    if cluster is None:
        run_local(todo, str(cache_root), options, on_done, progress, jobs=jobs)
    else:
        run_ray(todo, str(cache_root), options, on_done, cluster)
    bar.close()
    failures = {k: r for k, r in results.items() if not r["ok"]}
    collected = collect(plan, works, cache, failures)
    write_report(out_dir, collected, cache_root)
    computed = sum(len(r["computed"]) for r in results.values())
    unreadable = sum(c["status"] == "failed" and c["key"] not in failures for c in collected["cells"])
    summary = {
        "works_run": len(todo),
        "units_computed": computed,
        "failed": len(failures) + unreadable,
        "entries_written": sum(len(r.get("wrote", [])) for r in results.values()),
        "works_done_elsewhere": sum(r["ok"] and not r.get("wrote", True) for r in results.values()),
        "quarantined": [name for name, _ in cache.quarantined],
        "seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 1),
    }
    write_json_atomic(out_dir / "timings.json", summary)
    echo(
        f"study {spec.name}: {computed} results computed, {summary['failed']} failed, {summary['seconds']}s "
        f"({summary['cpu_seconds']} CPU s); report: {out_dir / 'report.md'}"
    )
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine a fairer measure of
    cost than wall time (wall on an idle n-core machine is about this / n)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def collect(plan: Plan, works: list[Work], cache: Cache, failures: dict[str, WorkResult] | None = None) -> StudyResults:
    """Everything the report needs, read back from the cache (so a rerun reproduces it exactly)."""
    failures = failures or {}
    cells: list[CellResult] = []
    for cell, qk in zip(plan.cells, plan.cell_keys):
        metrics, samples = {}, {}
        owed = plan.units_of(cell)
        evals = [cache.get_json("results", plan.unit_keys[qk][u.key]) for u in owed]
        for u, r in zip(owed, evals):
            if r is not None:
                metrics[u.key] = r["metric"]
                samples[u.key] = r["samples"]
        q = cache.get_json("quant", qk) if cell.recipe is not None else None
        status = "done" if len(metrics) == len(owed) else ("failed" if qk in failures else "pending")
        error = failures.get(qk, {}).get("error") if status == "failed" else None
        corrupt = dict(cache.quarantined)  # a cached but unreadable result is a failure to report, not "pending"
        bad = [n for n in (f"results/{plan.unit_keys[qk][u.key]}.json" for u in owed) if n in corrupt]
        if status != "done" and bad:
            status, error = (
                "failed",
                (
                    f"cache entry {bad[0]} is corrupt ({corrupt[bad[0]]}); moved to the "
                    "cache's quarantine, run the study again to recompute it"
                ),
            )
        cells.append(
            {
                **cell.to_dict(),
                "key": qk,
                "status": status,
                "metrics": metrics,
                "samples": samples,
                "error": error,
                "calib_manifest": (q or {}).get("calibration"),
                "quant_seconds": (q or {}).get("seconds"),
                "numerics": (q or {}).get("numerics"),
                "packed_bytes": (q or {}).get("packed_bytes"),
                "weight_formats": (q or {}).get("weight_formats"),
                "bench": cache.get_json("bench", qk) if cell.recipe is not None else None,
                "eval_seconds": round(sum(e["seconds"] for e in evals if e), 2),
            }
        )
    diag, diag_errors = {}, {}
    for w in works:
        if w["kind"] == "diag":
            diag[w["model"]["name"]] = all_pairs(w, cache.root)
            if w["key"] in failures:
                diag_errors[w["model"]["name"]] = failures[w["key"]]["error"]
    return {
        "spec": plan.spec,
        "units": plan.units,
        "cells": cells,
        "diagnostics": diag,
        "diag_errors": diag_errors,
        "versions": plan.versions,
    }


def report_only(out_dir: Path, cache_root: Path | None = None, data_dir: str | None = None) -> Path:
    """Rebuild the report of a run directory from the cache, computing nothing."""
    import json

    from ..errors import ConfigError
    from .report import write_report
    from .spec import study_from_dict

    meta_path = out_dir / "study.json"
    if not meta_path.is_file():
        raise ConfigError(
            f"{out_dir} is not a study run directory (no study.json); run `quantshift run STUDY.yaml` first"
        )
    meta = json.loads(meta_path.read_text())
    spec = study_from_dict(meta["spec"], str(meta_path))
    root = Path(cache_root or meta["cache"])
    recorded = meta.get("versions", {})
    plan = plan_study(
        spec,
        data_dir or meta.get("data_dir"),
        on_gpu=recorded.get("device") == "cuda",
        precision_auto=recorded.get("precision_auto"),
    )
    works = all_works(plan)
    last = out_dir / "last-run.json"
    failures = {}
    if last.is_file():
        failures = {k: r for k, r in json.loads(last.read_text()).get("results", {}).items() if not r["ok"]}
    return write_report(out_dir, collect(plan, works, Cache(root), failures), root)
