"""Execute one work: produce its model (load, or quantize through the cache) and evaluate the units
it still owes, writing each result to the cache as soon as it exists.

A work is plain JSON so an executor can ship it to another process or machine (Ray); it reads and
writes only the cache, so killing it at any moment loses at most the unit in progress.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import Cache
from .calib import obtain_calibset
from .diagnostics import run_diag_work
from .keys import CACHE_SCHEMA, model_identity
from .placement import check_placement
from .records import ModelWork, UnitRecord, Work, WorkResult
from .spec import CalibChoice, ModelAxis, digest

if TYPE_CHECKING:
    from ..evaluation.perplexity import HeldoutWindows
    from ..memory import MemoryPlan
    from ..models.load import LoadedModel


def pending_units(work: ModelWork, cache: Cache) -> list[UnitRecord]:
    return [u for u in work["units"] if not cache.has("results", u["key"])]


def has_quant_record(work: ModelWork, cache: Cache) -> bool:
    """The report's calibration manifest and quantize seconds: a lost record means quantizing again."""
    return work["recipe"] is None or cache.has("quant", work["key"])


def execute_work(work: Work, cache_root: str, options: dict, progress: bool = True) -> WorkResult:
    """Produce the work's model if any unit is missing, evaluate the missing units. Never raises."""
    cache = Cache(Path(cache_root))
    t0 = time.time()
    done: list[str] = []
    try:
        check_placement(work, options)  # the device and precision its cache keys were planned for
        if work["kind"] == "diag":
            return {
                "key": work["key"],
                "label": work["label"],
                "ok": True,
                "computed": [],
                "diag": run_diag_work(work, cache, options, progress),
                "seconds": round(time.time() - t0, 2),
                "wrote": cache.written,
            }
        else:
            todo = pending_units(work, cache)
            if work.get("memory_error") and (todo or not has_quant_record(work, cache)):
                raise MemoryError(work["memory_error"])
            if todo or not has_quant_record(work, cache):
                loaded = obtain_model(work, cache, options, progress)
                windows = WindowStore(cache, model_identity(ModelAxis(**work["model"])))
                for batch in unit_batches(todo):
                    t1 = time.time()
                    outputs = evaluate_units(loaded, batch, options, progress, windows)
                    secs = round((time.time() - t1) / len(batch), 2)
                    for u, (metric, samples) in zip(batch, outputs):
                        cache.put_json(
                            "results",
                            u["key"],
                            {
                                "unit": {k: u[k] for k in ("kind", "name", "shots")},
                                "settings": u["settings"],
                                "model_key": work["key"],
                                "metric": metric,
                                "samples": samples,
                                "seconds": secs,
                                "precision": loaded.precision.name,
                            },
                        )
                        done.append(u["key"])
                if loaded.scratch is not None and not options.get("bench"):  # streamed to disk only to be evaluated
                    import shutil

                    shutil.rmtree(loaded.scratch, ignore_errors=True)
                if options.get("bench") and work["recipe"] is not None and not cache.has("bench", work["key"]):
                    from ..bench.measure import study_bench

                    cache.put_json("bench", work["key"], study_bench(cache.model_dir(work["key"]), options["device"]))
        return {
            "key": work["key"],
            "label": work["label"],
            "ok": True,
            "computed": done,
            "seconds": round(time.time() - t0, 2),
            "wrote": cache.written,
        }
    except Exception as err:  # a failed cell is recorded and the study goes on
        return {
            "key": work["key"],
            "label": work["label"],
            "ok": False,
            "computed": done,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=8),
            "seconds": round(time.time() - t0, 2),
            "wrote": cache.written,
        }


def weight_formats(modules: dict) -> dict:
    """Stored format of every quantized weight, for the report's packed sizes: bits, group size,
    symmetric, and the bits a method measured itself (SpQR's outliers and second-level stats)."""
    out = {}
    for name, m in sorted(modules.items()):
        spec = m.weight_spec
        if spec is None:
            continue
        out[name] = {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "sym": spec.symmetric,
            "dtype": spec.dtype,
            "measured_bits": m.info.get("bits") if "params" in m.info else None,
        }
    return out


def model_plan(model: ModelAxis, work: ModelWork, options: dict, device: str, *, quantize: bool) -> MemoryPlan:
    """The memory plan (memory.py) of a work's model within the study's --max-memory."""
    from ..memory import plan_for_model

    calib = work["calib"]
    tokens = calib["n"] * calib["seqlen"] * len(calib["source"].split("+")) if quantize and calib else 0
    windows = max((u["settings"].get("windows") or 64 for u in work["units"] if u["kind"] == "ppl"), default=64)
    seqlen = max((u["settings"].get("seqlen", 512) for u in work["units"] if u["kind"] == "ppl"), default=512)
    return plan_for_model(
        model.name,
        device=device,
        dtype=model.dtype,
        max_memory=options.get("max_memory"),
        quantize=quantize,
        calib_tokens=tokens,
        calibrated=calib is not None,
        batch_size=options["eval_batch_size"],
        seqlen=seqlen,
        max_windows=windows,
    )


def obtain_model(work: ModelWork, cache: Cache, options: dict, progress: bool) -> LoadedModel:
    from ..models.load import load_model, resolve_device

    model = ModelAxis(**work["model"])
    device = resolve_device(options["device"])
    dtype = model.dtype
    if work["recipe"] is None:
        plan = model_plan(model, work, options, device, quantize=False)
        loaded = load_model(model.name, device=device, dtype=dtype, stream=plan.streams("evaluate"))
        loaded.memory = plan
        return loaded
    kept = cache.model_dir(work["key"])
    if kept.is_dir() and cache.has("quant", work["key"]):  # without its record, quantize again to make one
        from ..errors import ModelError

        try:
            plan = model_plan(model, work, options, device, quantize=False)
            loaded = load_model(str(kept), device=device, dtype=dtype, stream=plan.streams("evaluate"))
            loaded.memory = plan
            return loaded
        except ModelError as err:  # a damaged kept model: set it aside and quantize again
            cache.quarantine(kept, str(err))
    from ..pipeline import quantize_model, quantize_streaming, save
    from ..quant.storage import packed_bytes, specs_from_modules
    from ..recipes import recipe_from_dict

    recipe = recipe_from_dict(work["recipe"])
    plan = model_plan(model, work, options, device, quantize=True)
    stream = plan.streams("quantize")
    loaded = load_model(model.name, device="cpu", dtype=dtype, compute_device=device, stream=stream)
    calib = CalibChoice(**work["calib"]) if work["calib"] is not None else None
    cal = None
    if calib is not None:
        assert work["calib_key"] is not None  # planned together with calib
        cal = obtain_calibset(loaded, model, calib, work["calib_key"], cache, options["data_dir"])
    propagate = calib.propagate if calib is not None else "quantized"
    store = None
    if propagate == "fp":
        from ..quant.statstore import StatsStore

        store = StatsStore(
            cache.root / "stats",
            digest({"model": model_identity(model), "dtype": loaded.precision.name, "schema": CACHE_SCHEMA}),
        )
    if stream:  # the model does not fit: quantized from disk into the cache's model directory
        qres = quantize_streaming(
            loaded,
            recipe,
            cal,
            kept,
            device=device,
            batch_size=options["batch_size"],
            progress=progress,
            propagate=propagate,
            stats_store=store,
            overwrite=True,
            max_shard_bytes=plan.shard_bytes,
        )
    else:
        qres = quantize_model(
            loaded,
            recipe,
            cal,
            device=device,
            batch_size=options["batch_size"],
            progress=progress,
            propagate=propagate,
            stats_store=store,
        )
        loaded.model.to(device)
    report = qres.report()
    formats = weight_formats(qres.engine.modules)
    measured = {name: f["measured_bits"] for name, f in formats.items()}
    cache.put_json(
        "quant",
        work["key"],
        {
            "label": work["label"],
            "recipe": report["recipe"],
            "precision": report["precision"],
            "calibration": report["calibration"],
            "seconds": report["seconds"],
            "numerics": report.get("numerics"),
            "weight_formats": formats,
            "packed_bytes": packed_bytes(loaded.model, specs_from_modules(qres.engine.modules), measured_bits=measured),
        },
    )
    if stream:  # evaluated from its directory; kept in the cache only when the study keeps models
        eval_plan = model_plan(model, work, options, device, quantize=False)
        result = load_model(str(kept), device=device, dtype=dtype, stream=eval_plan.streams("evaluate"))
        result.memory = eval_plan
        result.scratch = None if options["keep_models"] else kept
        return result
    if options["keep_models"]:
        save(loaded, qres, kept, overwrite=True, max_shard_bytes=plan.shard_bytes)
    return loaded


def unit_batches(units: list[UnitRecord]) -> list[list[UnitRecord]]:
    """Perplexity units one by one; task units with the same shots and chat template together, as
    one harness call costs a fixed setup (model wrapper, task files) that should not be paid per task."""
    out: list[list[UnitRecord]] = [[u] for u in units if u["kind"] == "ppl"]
    together: dict[tuple[int, str], list[UnitRecord]] = {}
    for u in units:
        if u["kind"] == "task":
            together.setdefault((u["shots"], u["settings"].get("chat_template", "off")), []).append(u)
    return out + list(together.values())


@dataclass(frozen=True)
class WindowStore:
    """Perplexity windows per (tokenizer, source, seqlen, count), cached: tokenizing a whole held-out
    split again for every model of a study costs more than scoring a few windows."""

    cache: Cache
    model: dict

    def get(self, loaded: LoadedModel, source: str, seqlen: int, windows: int, data_dir: str | None) -> HeldoutWindows:
        """The windows and each one's scored UTF-8 bytes/characters (evaluation.perplexity.HeldoutWindows)."""
        from ..evaluation.perplexity import HeldoutWindows

        tok = loaded.tokenizer
        bos = tok.bos_token_id if loaded.needs_bos else None
        key = digest(
            {
                "model": self.model,
                "source": source,
                "seqlen": seqlen,
                "windows": windows,
                "bos": bos,
                "schema": CACHE_SCHEMA,
            }
        )
        with self.cache.claim("windows", key):  # every work of a model shares them: tokenize once
            got = self.cache.get_tensors("windows", key)
            if got is not None and "bytes" in got:  # entries from before bits per byte lack the counts: rebuilt
                return HeldoutWindows(
                    got["ids"],
                    got["bytes"].tolist(),
                    got["chars"].tolist(),
                    "offsets" if int(got["method"][0]) == 0 else "decode",
                )
            hw = scored_windows(loaded, source, seqlen, windows, data_dir)
            self.cache.put_tensors(
                "windows",
                key,
                {
                    "ids": hw.ids,
                    "bytes": torch.tensor(hw.bytes),
                    "chars": torch.tensor(hw.chars),
                    "method": torch.tensor([0 if hw.method == "offsets" else 1]),
                },
            )
            return hw


def scored_windows(loaded: LoadedModel, source: str, seqlen: int, windows: int, data_dir: str | None) -> HeldoutWindows:
    """Held-out windows of a source for this model's tokenizer, with their scored bytes/characters."""
    from ..errors import DataError
    from ..evaluation.perplexity import heldout_windows
    from .spec import resolve_source

    tok = loaded.tokenizer
    text = resolve_source(source, data_dir).text("heldout")
    if not text.strip():
        raise DataError(f"text source {source!r} has no heldout text")
    return heldout_windows(text, tok, seqlen, tok.bos_token_id if loaded.needs_bos else None, windows or None)


def evaluate_units(
    loaded: LoadedModel, batch: list[UnitRecord], options: dict, progress: bool, windows: WindowStore | None = None
) -> list[tuple[dict, list[dict]]]:
    if batch[0]["kind"] == "ppl":
        s = batch[0]["settings"]
        win = windows.get(loaded, s["source"], s["seqlen"], s["windows"], options["data_dir"]) if windows else None
        return [
            ppl_with_samples(
                loaded,
                s["source"],
                s["seqlen"],
                s["windows"],
                options["eval_batch_size"],
                progress,
                options["data_dir"],
                win,
            )
        ]
    from ..evaluation.run import evaluate

    s = batch[0]["settings"]
    res = evaluate(
        loaded,
        tasks=tuple(u["settings"]["task"] for u in batch),
        shots=(s["shots"],),
        limit=s["limit"],
        data_dir=options["data_dir"],
        batch_size=options["eval_batch_size"],
        seed=s["seed"],
        progress=progress,
        chat_template=s.get("chat_template", "off"),
    )
    out = []
    for u in batch:
        name = u["settings"]["task"]
        key = f"task:{name}@{s['shots']}"  # given shots apply to every task, BOSS's too
        if key not in res.metrics:
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


def ppl_with_samples(
    loaded: LoadedModel,
    source: str,
    seqlen: int,
    windows: int,
    batch_size: int,
    progress: bool,
    data_dir: str | None = None,
    win: HeldoutWindows | None = None,
) -> tuple[dict, list[dict]]:
    """Perplexity by evaluation/perplexity.py's protocol, keeping each window's NLL so calibration
    choices can be compared with a paired bootstrap over windows, and each window's scored bytes
    and characters for bits per byte (the tokenizer-independent measure; `win`: HeldoutWindows)."""
    from ..evaluation.perplexity import bits_per_unit, window_nlls

    hw = win if win is not None else scored_windows(loaded, source, seqlen, windows, data_dir)
    nlls = window_nlls(loaded, hw.ids, batch_size, progress, f"ppl {source}")
    per_window = [(float(v), hw.ids.shape[1] - 1) for v in nlls]
    total = sum(v for v, _ in per_window)
    count = sum(n for _, n in per_window)
    mean = total / count
    n_bytes, n_chars = sum(hw.bytes), sum(hw.chars)
    metric = {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "windows": len(per_window),
        "seqlen": seqlen,
        "source": source,
        "split": "heldout",
        "bytes": n_bytes,
        "chars": n_chars,
        "bpb": bits_per_unit(total, n_bytes),
        "bpc": bits_per_unit(total, n_chars),
        "text_units": hw.method,
    }
    samples = [
        {"id": f"w{i}", "nll": v / n, "tokens": n, "bytes": b, "chars": c}
        for i, ((v, n), b, c) in enumerate(zip(per_window, hw.bytes, hw.chars))
    ]
    return metric, samples
