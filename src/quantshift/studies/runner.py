"""Plan a study into works, run each work through the cache, gather results.

A *work* is one model to produce (fp, or quantized with a recipe on a calibration set) and the
evaluation units it still owes. Cells that produce the same model (RTN under any calibration
source, the same recipe listed twice) share one work because they share its cache key. A work is
plain JSON so an executor can ship it to another process or machine (Ray); it reads and writes
only the cache, so killing it at any moment loses at most the unit in progress.
"""

from __future__ import annotations

import hashlib
import math
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .cache import Cache
from .spec import CalibChoice, Cell, EvalUnit, ModelAxis, StudySpec, digest, eval_units, expand, precision_of

CACHE_SCHEMA = 3  # bump when a cached artifact's meaning changes (3: --dtype auto means bf16 autocast on bf16 CPUs)


def code_versions() -> dict[str, str]:
    """Versions that can change a result; part of every cache key."""
    import transformers

    from .. import __version__

    out = {"quantshift": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "schema": str(CACHE_SCHEMA)}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    return out


def model_identity(model: ModelAxis) -> dict:
    """Name and dtype, plus a fingerprint of a local directory's config and weight files."""
    ident: dict[str, Any] = {"name": model.name, "dtype": model.dtype}
    p = Path(model.name).expanduser()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                h.update(f.name.encode())
                h.update(f.read_bytes() if f.stat().st_size < (1 << 24) else str(f.stat().st_size).encode())
        ident["fingerprint"] = h.hexdigest()[:16]
    return ident


def calib_key(model: ModelAxis, calib: CalibChoice, versions: dict) -> str:
    """The calibration token ids' key: how blocks are then propagated does not change them."""
    choice = {k: v for k, v in calib.to_dict().items() if k != "propagate"}
    return digest({"model": model_identity(model), "calib": choice, "quantshift": versions["quantshift"]})


def quant_key(cell: Cell, versions: dict) -> str:
    uses_calib = bool(cell.calib and cell.recipe and cell.recipe.needs_calibration)
    ck = calib_key(cell.model, cell.calib, versions) if uses_calib else None  # type: ignore[arg-type]
    key = {"model": model_identity(cell.model), "recipe": cell.recipe.to_dict() if cell.recipe else None,
           "calib": ck, "versions": versions}
    if uses_calib and cell.calib.propagate != "quantized":  # type: ignore[union-attr]
        key["propagate"] = cell.calib.propagate  # type: ignore[union-attr]
    return digest(key)


def unit_settings(spec: StudySpec, unit: EvalUnit) -> dict:
    ev = spec.evaluation
    if unit.kind == "ppl":
        return {"kind": "ppl", "source": unit.name, "seqlen": ev.ppl_seqlen, "windows": ev.ppl_windows}
    return {"kind": "task", "task": unit.name, "shots": unit.shots, "limit": ev.limit, "seed": 1234}


def unit_key(qkey: str, settings: dict, versions: dict) -> str:
    return digest({"model": qkey, "eval": settings, "versions": versions})


@dataclass
class Plan:
    spec: StudySpec
    cells: list[Cell]
    cell_keys: list[str]  # quant key of each cell
    works: list[dict]  # unique by quant key, in cell order
    units: list[EvalUnit]
    unit_keys: dict[str, dict[str, str]]  # quant key -> unit.key -> result key
    versions: dict = field(default_factory=dict)


def plan_study(spec: StudySpec, data_dir: str | None = None, on_gpu: bool | None = None,
               precision_auto: str | None = None) -> Plan:
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
    works: dict[str, dict] = {}
    keys: list[str] = []
    ukeys: dict[str, dict[str, str]] = {}
    for cell in cells:
        qk = quant_key(cell, versions)
        keys.append(qk)
        if qk in works:
            continue
        ukeys[qk] = {u.key: unit_key(qk, unit_settings(spec, u), versions) for u in units}
        needs_cal = bool(cell.calib and cell.recipe and cell.recipe.needs_calibration)
        works[qk] = {
            "kind": "model", "key": qk, "label": cell.label, "model": cell.model.model_dump(),
            "precision": precision_of(cell.model, versions),
            "recipe": cell.recipe.to_dict() if cell.recipe else None,
            "calib": cell.calib.to_dict() if needs_cal else None,
            "calib_key": calib_key(cell.model, cell.calib, versions) if needs_cal else None,
            "units": [{"kind": u.kind, "name": u.name, "shots": u.shots, "key": ukeys[qk][u.key],
                       "settings": unit_settings(spec, u)} for u in units],
        }
    return Plan(spec, cells, keys, list(works.values()), units, ukeys, versions)


def options_of(spec: StudySpec, data_dir: str | None) -> dict:
    return {"device": spec.device, "batch_size": spec.batch_size, "eval_batch_size": spec.evaluation.batch_size,
            "keep_models": spec.keep_models, "data_dir": data_dir}


def pending_units(work: dict, cache: Cache) -> list[dict]:
    return [u for u in work["units"] if not cache.has("results", u["key"])]


# ---------------------------------------------------------------- executing one work

def execute_work(work: dict, cache_root: str, options: dict, progress: bool = True) -> dict:
    """Produce the work's model if any unit is missing, evaluate the missing units. Never raises."""
    cache = Cache(Path(cache_root))
    t0 = time.time()
    done: list[str] = []
    try:
        if work["kind"] == "diag":
            from .diagnostics import run_diag_work

            return {"key": work["key"], "label": work["label"], "ok": True, "computed": [],
                    "diag": run_diag_work(work, cache, options, progress), "seconds": round(time.time() - t0, 2)}
        else:
            todo = pending_units(work, cache)
            if todo:
                loaded = obtain_model(work, cache, options, progress)
                windows = WindowStore(cache, model_identity(ModelAxis(**work["model"])))
                for batch in unit_batches(todo):
                    t1 = time.time()
                    outputs = evaluate_units(loaded, batch, options, progress, windows)
                    secs = round((time.time() - t1) / len(batch), 2)
                    for u, (metric, samples) in zip(batch, outputs):
                        cache.put_json("results", u["key"], {
                            "unit": {k: u[k] for k in ("kind", "name", "shots")}, "settings": u["settings"],
                            "model_key": work["key"], "metric": metric, "samples": samples, "seconds": secs,
                            "precision": loaded.precision.name})
                        done.append(u["key"])
        return {"key": work["key"], "label": work["label"], "ok": True, "computed": done,
                "seconds": round(time.time() - t0, 2)}
    except Exception as err:  # a failed cell is recorded and the study goes on
        return {"key": work["key"], "label": work["label"], "ok": False, "computed": done,
                "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8),
                "seconds": round(time.time() - t0, 2)}


def obtain_model(work: dict, cache: Cache, options: dict, progress: bool):
    from ..models.load import load_model, resolve_device

    model = ModelAxis(**work["model"])
    device = resolve_device(options["device"])
    dtype = model.dtype
    if work["recipe"] is None:
        return load_model(model.name, device=device, dtype=dtype)
    kept = cache.model_dir(work["key"])
    if kept.is_dir():
        return load_model(str(kept), device=device, dtype=dtype)
    from ..quantize import quantize_model, save
    from ..recipes import recipe_from_dict

    recipe = recipe_from_dict(work["recipe"])
    loaded = load_model(model.name, device="cpu", dtype=dtype, compute_device=device)
    cal = None
    if work["calib"] is not None:
        cal = obtain_calibset(loaded, model, CalibChoice(**work["calib"]), work["calib_key"], cache, options["data_dir"])
    calib = CalibChoice(**work["calib"]) if work["calib"] is not None else None
    propagate = calib.propagate if calib is not None else "quantized"
    store = None
    if propagate == "fp":
        from ..quant.statstore import StatsStore

        store = StatsStore(cache.root / "stats", digest({"model": model_identity(model), "dtype": loaded.precision.name,
                                                        "schema": CACHE_SCHEMA}))
    qres = quantize_model(loaded, recipe, cal, device=device, batch_size=options["batch_size"], progress=progress,
                          propagate=propagate, stats_store=store)
    loaded.model.to(device)
    report = qres.report()
    cache.put_json("quant", work["key"], {"label": work["label"], "recipe": report["recipe"],
                                          "precision": report["precision"],
                                          "calibration": report["calibration"], "seconds": report["seconds"],
                                          "layer_errors": _layer_errors(report),
                                          "weight_formats": weight_formats(qres.engine.modules)})
    if options["keep_models"]:
        save(loaded, qres, kept, overwrite=True)
    return loaded


def weight_formats(modules: dict) -> dict:
    """Stored format of every quantized weight, for the report's packed sizes: bits, group size,
    symmetric, and the bits a method measured itself (SpQR's outliers and second-level stats)."""
    out = {}
    for name, m in sorted(modules.items()):
        if m.qweight is None:
            continue
        spec = m.qweight.spec
        out[name] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.symmetric, "dtype": spec.dtype,
                     "measured_bits": m.info.get("bits") if "params" in m.info else None}
    return out


def _layer_errors(report: dict) -> dict:
    out = {}
    for name, m in report.get("modules", {}).items():
        err = m.get("weight_rel_err", m.get("output_rel_err"))
        if isinstance(err, (int, float)):
            out[name] = round(float(err), 6)
    return out


def obtain_calibset(loaded, model: ModelAxis, calib: CalibChoice, key: str, cache: Cache, data_dir: str | None = None):
    """The calibration set from the cache, or built and stored (tokens mode or examples mode)."""
    from ..data.calibset import CalibManifest, CalibSet

    got = cache.get_tensors("calib", key)
    meta = cache.get_json("calib", key)
    if got is not None and meta is not None:
        return CalibSet(got["input_ids"], CalibManifest(**meta["manifest"]))
    cs = build_study_calibset(loaded, model.name, calib, data_dir)
    cache.put_tensors("calib", key, {"input_ids": cs.input_ids})
    cache.put_json("calib", key, {"manifest": cs.manifest.to_dict(), "choice": calib.to_dict()})
    return cs


def build_study_calibset(loaded, model_name: str, calib: CalibChoice, data_dir: str | None = None):
    """build_calibset's token-budget sampling (same windows, same manifest), over any study source;
    or the examples mode."""
    from ..data.calibset import (
        CalibManifest,
        CalibSet,
        ids_sha256,
        sample_windows,
        split_union,
        token_stream,
        union_calibset,
    )
    from .spec import resolve_source

    names = split_union(calib.source)
    if len(names) > 1:  # a union: each part exactly as it would be alone (same cache-free sampling)
        return union_calibset([build_study_calibset(loaded, model_name, replace(calib, source=p), data_dir)
                               for p in names])
    source = resolve_source(calib.source, data_dir, calib.answers)
    bos = loaded.tokenizer.bos_token_id if loaded.needs_bos else None
    if calib.mode == "tokens":
        stream = token_stream(source, "calib", loaded.tokenizer)
        ids = sample_windows(stream, calib.n, calib.seqlen, calib.seed, bos, f"calibration part of {calib.source!r}")
        mode = "windows"
    else:
        ids = pack_examples(source.documents("calib"), loaded.tokenizer, calib)
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos), ids[:, :-1]], dim=1)
        mode = f"examples:{calib.n}:{calib.order}"
    manifest = CalibManifest(source=calib.source, split="calib", seed=calib.seed, n=ids.shape[0], seqlen=ids.shape[1],
                             tokens=ids.numel(), tokenizer=model_name, sha256=ids_sha256(ids), mode=mode)
    return CalibSet(ids, manifest)


def pack_examples(docs: list[str], tokenizer, calib: CalibChoice) -> torch.Tensor:
    """n examples (seeded or first n), each cut to seqlen tokens, joined by EOS and packed into
    windows of seqlen; the engine needs a rectangle, and packing keeps every example's tokens."""
    from ..errors import DataError

    if len(docs) < calib.n:
        raise DataError(f"calibration source {calib.source!r} has {len(docs)} examples; asked for {calib.n}")
    if calib.order == "first":
        picks = list(range(calib.n))
    else:
        g = torch.Generator().manual_seed(calib.seed)
        picks = sorted(torch.randperm(len(docs), generator=g)[:calib.n].tolist())
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i in picks:
        ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"][: calib.seqlen]
        stream += ids + ([eos] if eos is not None else [])
    rows = max(1, len(stream) // calib.seqlen)
    width = min(calib.seqlen, len(stream))
    return torch.tensor(stream[: rows * width], dtype=torch.int64).reshape(rows, width)


def unit_batches(units: list[dict]) -> list[list[dict]]:
    """Perplexity units one by one; task units with the same shots together, as one harness call
    costs a fixed setup (model wrapper, task files) that should not be paid per task."""
    out: list[list[dict]] = [[u] for u in units if u["kind"] == "ppl"]
    by_shots: dict[int, list[dict]] = {}
    for u in units:
        if u["kind"] == "task":
            by_shots.setdefault(u["shots"], []).append(u)
    return out + list(by_shots.values())


@dataclass(frozen=True)
class WindowStore:
    """Perplexity windows per (tokenizer, source, seqlen, count), cached: tokenizing a whole held-out
    split again for every model of a study costs more than scoring a few windows."""

    cache: Cache
    model: dict

    def get(self, loaded, source: str, seqlen: int, windows: int, data_dir: str | None):
        """The windows and each one's scored UTF-8 bytes/characters (evaluation.perplexity.HeldoutWindows)."""
        from ..evaluation.perplexity import HeldoutWindows

        tok = loaded.tokenizer
        bos = tok.bos_token_id if loaded.needs_bos else None
        key = digest({"model": self.model, "source": source, "seqlen": seqlen, "windows": windows, "bos": bos,
                      "schema": CACHE_SCHEMA})
        got = self.cache.get_tensors("windows", key)
        if got is not None and "bytes" in got:  # entries from before bits per byte lack the counts: rebuilt
            return HeldoutWindows(got["ids"], got["bytes"].tolist(), got["chars"].tolist(),
                                  "offsets" if int(got["method"][0]) == 0 else "decode")
        hw = scored_windows(loaded, source, seqlen, windows, data_dir)
        self.cache.put_tensors("windows", key, {"ids": hw.ids, "bytes": torch.tensor(hw.bytes), "chars": torch.tensor(hw.chars),
                                                "method": torch.tensor([0 if hw.method == "offsets" else 1])})
        return hw


def scored_windows(loaded, source: str, seqlen: int, windows: int, data_dir: str | None):
    """Held-out windows of a source for this model's tokenizer, with their scored bytes/characters."""
    from ..errors import DataError
    from ..evaluation.perplexity import heldout_windows
    from .spec import resolve_source

    tok = loaded.tokenizer
    text = resolve_source(source, data_dir).text("heldout")
    if not text.strip():
        raise DataError(f"text source {source!r} has no heldout text")
    return heldout_windows(text, tok, seqlen, tok.bos_token_id if loaded.needs_bos else None, windows or None)


def evaluate_units(loaded, batch: list[dict], options: dict, progress: bool,
                   windows: WindowStore | None = None) -> list[tuple[dict, list[dict]]]:
    if batch[0]["kind"] == "ppl":
        s = batch[0]["settings"]
        win = windows.get(loaded, s["source"], s["seqlen"], s["windows"], options["data_dir"]) if windows else None
        return [ppl_with_samples(loaded, s["source"], s["seqlen"], s["windows"], options["eval_batch_size"], progress,
                                 options["data_dir"], win)]
    from ..evaluation.api import evaluate

    s = batch[0]["settings"]
    res = evaluate(loaded, tasks=tuple(u["settings"]["task"] for u in batch), shots=(s["shots"],), limit=s["limit"],
                   data_dir=options["data_dir"], batch_size=options["eval_batch_size"], seed=s["seed"], progress=progress)
    out = []
    for u in batch:
        name = u["settings"]["task"]
        # tasks with fixed shot counts (BOSS) report under their own shots
        key = next((k for k in res.metrics if k == f"task:{name}@{s['shots']}"),
                   next((k for k in res.metrics if k.startswith(f"task:{name}@")), None))
        if key is None:
            raise RuntimeError(f"the evaluation returned no result for task {name!r}")
        out.append((_plain(res.metrics[key]), _plain(res.samples.get(key, []))))
    return out


def _plain(obj: Any) -> Any:
    """JSON-safe copy (floats stay floats, NaN -> None) so cached results compare equal on reload."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return _plain(obj.item())
    return obj


def ppl_with_samples(loaded, source: str, seqlen: int, windows: int, batch_size: int,
                     progress: bool, data_dir: str | None = None, win=None) -> tuple[dict, list[dict]]:
    """Perplexity by evaluation/perplexity.py's protocol, keeping each window's NLL so calibration
    choices can be compared with a paired bootstrap over windows, and each window's scored bytes
    and characters for bits per byte (the tokenizer-independent measure; `win`: HeldoutWindows)."""
    from ..evaluation.perplexity import bits_per_unit, window_nlls

    hw = win if win is not None else scored_windows(loaded, source, seqlen, windows, data_dir)
    nlls = window_nlls(loaded.model, hw.ids, batch_size, progress, f"ppl {source}", loaded.compute)
    per_window = [(float(v), hw.ids.shape[1] - 1) for v in nlls]
    total = sum(v for v, _ in per_window)
    count = sum(n for _, n in per_window)
    mean = total / count
    n_bytes, n_chars = sum(hw.bytes), sum(hw.chars)
    metric = {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(per_window), "seqlen": seqlen,
              "source": source, "split": "heldout", "bytes": n_bytes, "chars": n_chars,
              "bpb": bits_per_unit(total, n_bytes), "bpc": bits_per_unit(total, n_chars), "text_units": hw.method}
    samples = [{"id": f"w{i}", "nll": v / n, "tokens": n, "bytes": b, "chars": c}
               for i, ((v, n), b, c) in enumerate(zip(per_window, hw.bytes, hw.chars))]
    return metric, samples


# ---------------------------------------------------------------- running a study

def needs_work(work: dict, cache: Cache) -> bool:
    if work["kind"] == "diag":
        return any(not cache.has("diag", s["key"], ".pt") for s in work["sets"])
    return bool(pending_units(work, cache))


def all_works(plan: Plan) -> list[dict]:
    from .diagnostics import diag_work

    works = list(plan.works)
    for model in plan.spec.models:
        d = diag_work(plan.spec, model, plan.versions)
        if d is not None:
            # right after the model's fp reference: cheap, and a partial run already has them
            at = next((i + 1 for i, w in enumerate(works) if w["model"] == d["model"] and w["recipe"] is None), len(works))
            works.insert(at, d)
    return works


def run_study(spec: StudySpec, out_dir: Path, cache_root: Path, *, executor: str = "local", ray_address: str | None = None,
              gpus_per_cell: float = 0.0, data_dir: str | None = None, progress: bool = True, echo=print,
              jobs: int = 1) -> dict:
    """Run every missing piece of the study, then gather results and write the report.
    `jobs`: worker processes of the local executor (1: in this process)."""
    from tqdm.auto import tqdm

    from ..checkpoint import write_json_atomic
    from ..errors import ConfigError
    from .executors import run_local, run_ray
    from .report import write_report

    if jobs < 1:
        raise ConfigError(f"jobs must be 1 or more, got {jobs}")
    if jobs > 1 and executor != "local":
        raise ConfigError(f"jobs applies to the local executor; the {executor} executor schedules works itself")
    t0, cpu0 = time.time(), _cpu_seconds()
    plan = plan_study(spec, data_dir, on_gpu=True if gpus_per_cell > 0 else None)
    works = all_works(plan)
    cache = Cache(Path(cache_root))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "study.json", {"spec": spec.model_dump(mode="json"), "versions": plan.versions,
                                               "cache": str(Path(cache_root).resolve()), "data_dir": data_dir,
                                               "cells": [dict(c.to_dict(), key=k) for c, k in zip(plan.cells, plan.cell_keys)]})
    todo = [w for w in works if needs_work(w, cache)]
    echo(f"study {spec.name}: {len(plan.cells)} cells -> {len(plan.works)} distinct models x {len(plan.units)} "
         f"evaluations; {len(works) - len(todo)} of {len(works)} works already cached, {len(todo)} to run "
         f"({executor}{f', {jobs} jobs' if jobs > 1 else ''})")
    results: dict[str, dict] = {}
    write_json_atomic(out_dir / "last-run.json", {"results": results})
    bar = tqdm(total=len(todo), desc="study", unit="work", disable=not progress or not todo, position=0)

    def on_done(res: dict) -> None:
        results[res["key"]] = res
        status = "ok" if res["ok"] else f"FAILED ({res['error']})"
        bar.update(1)
        n = len(results)
        what = f"{len(res['diag'])} diagnostic sets" if "diag" in res else f"{len(res['computed'])} results"
        tqdm.write(f"  [{n}/{len(todo)}] {res['label']}: {status}, {what} computed in {res['seconds']:.1f}s")
        write_json_atomic(out_dir / "last-run.json", {"results": results})

    options = options_of(spec, data_dir)
    if executor == "local":
        run_local(todo, str(cache_root), options, on_done, progress, jobs=jobs)
    elif executor == "ray":
        run_ray(todo, str(cache_root), options, on_done, address=ray_address, gpus=gpus_per_cell)
    else:
        raise ConfigError(f"unknown executor {executor!r}; allowed: local, ray")
    bar.close()
    failures = {k: r for k, r in results.items() if not r["ok"]}
    collected = collect(plan, works, cache, failures)
    write_report(out_dir, collected, cache_root)
    computed = sum(len(r["computed"]) for r in results.values())
    summary = {"works_run": len(todo), "units_computed": computed, "failed": len(failures),
               "seconds": round(time.time() - t0, 1), "cpu_seconds": round(_cpu_seconds() - cpu0, 1)}
    write_json_atomic(out_dir / "timings.json", summary)
    echo(f"study {spec.name}: {computed} results computed, {len(failures)} failed, {summary['seconds']}s "
         f"({summary['cpu_seconds']} CPU s); report: {out_dir / 'report.md'}")
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine a fairer measure of
    cost than wall time (wall on an idle n-core machine is about this / n)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def collect(plan: Plan, works: list[dict], cache: Cache, failures: dict[str, dict] | None = None) -> dict:
    """Everything the report needs, read back from the cache (so a rerun reproduces it exactly)."""
    failures = failures or {}
    cells = []
    for cell, qk in zip(plan.cells, plan.cell_keys):
        metrics, samples = {}, {}
        for u in plan.units:
            r = cache.get_json("results", plan.unit_keys[qk][u.key])
            if r is not None:
                metrics[u.key] = r["metric"]
                samples[u.key] = r["samples"]
        q = cache.get_json("quant", qk) if cell.recipe is not None else None
        evals = [cache.get_json("results", plan.unit_keys[qk][u.key]) for u in plan.units]
        status = "done" if len(metrics) == len(plan.units) else ("failed" if qk in failures else "pending")
        cells.append({**cell.to_dict(), "key": qk, "status": status, "metrics": metrics, "samples": samples,
                      "error": failures.get(qk, {}).get("error") if status == "failed" else None,
                      "calib_manifest": (q or {}).get("calibration"),
                      "weight_formats": (q or {}).get("weight_formats"),
                      "quant_seconds": (q or {}).get("seconds"),
                      "eval_seconds": round(sum(e["seconds"] for e in evals if e), 2)})
    from .diagnostics import all_pairs

    diag, diag_errors = {}, {}
    for w in works:
        if w["kind"] == "diag":
            diag[w["model"]["name"]] = all_pairs(w, cache.root)
            if w["key"] in failures:
                diag_errors[w["model"]["name"]] = failures[w["key"]]["error"]
    return {"spec": plan.spec, "units": plan.units, "cells": cells, "diagnostics": diag, "diag_errors": diag_errors,
            "versions": plan.versions}


def report_only(out_dir: Path, cache_root: Path | None = None, data_dir: str | None = None) -> Path:
    """Rebuild the report of a run directory from the cache, computing nothing."""
    import json

    from ..errors import ConfigError
    from .report import write_report
    from .spec import study_from_dict

    meta_path = out_dir / "study.json"
    if not meta_path.is_file():
        raise ConfigError(f"{out_dir} is not a study run directory (no study.json); run `quantshift run STUDY.yaml` first")
    meta = json.loads(meta_path.read_text())
    spec = study_from_dict(meta["spec"], str(meta_path))
    root = Path(cache_root or meta["cache"])
    recorded = meta.get("versions", {})
    plan = plan_study(spec, data_dir or meta.get("data_dir"), on_gpu=recorded.get("device") == "cuda",
                      precision_auto=recorded.get("precision_auto"))
    works = all_works(plan)
    last = out_dir / "last-run.json"
    failures = {}
    if last.is_file():
        failures = {k: r for k, r in json.loads(last.read_text()).get("results", {}).items() if not r["ok"]}
    return write_report(out_dir, collect(plan, works, Cache(root), failures), root)
