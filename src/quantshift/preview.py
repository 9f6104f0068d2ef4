"""`quantshift check STUDY.yaml|RECIPE.yaml`: validate a file and say what it would run.

A dry run: nothing is written to the run or study-cache directories (only the machine-speed
record). For a study: the works and evaluation units the runner would plan, how many the cache
already holds, and a time estimate; for a recipe: its stages with every setting resolved.

The estimate is a per-token model scaled by this machine's measured speed (machine_speed: a
float32 and a bf16 GEMM rate and smollm2-135m's scoring rate in each precision, measured once
per machine and thread layout, ~30 s, then cached). With e = the seconds one scored token takes
per decoder block at that scoring rate, in the precision the study's models compute in:
  evaluation            scored tokens x blocks x e
  calibrated quantizing blocks x (calibration tokens x Q_PER_TOKEN + FIXED_TOKENS)[precision] x e
  uncalibrated (RTN)    blocks x RTN_BLOCK_S x REF_GEMM_FP32 / this machine's float32 GEMM rate
  diagnostics           their sets' tokens x blocks x e
  every work            WORK_FIXED_S (model load, cache writes, packing)
all scaled by (hidden / 576)^2 for models of another width; the wall time is the sum over works
divided by --jobs. Generated task answers (if_verifiable) count as scored tokens: an underestimate.
The constants were fitted on one machine (benchmarks/cpu_speed.py, see docs/performance.md); the
GPU factor is an assumption.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import validate

if TYPE_CHECKING:
    from .recipes import Recipe
    from .studies.spec import StudySpec

# fitted with `python benchmarks/cpu_speed.py --fit` (docs/performance.md) on a 2-core Xeon with AMX,
# one thread: GPTQ W3 g64 seconds per block at 16 and 32 x 512 calibration tokens against the probe's
# scoring rate in the same precision (float32 500 tok/s, bf16 1330 tok/s there). Per block, in units
# of e (a scored token's seconds per block):
Q_PER_TOKEN = {"float32": 2.24, "bfloat16": 3.05}  # a calibration token: forward passes + Hessians
# what does not grow with calibration tokens: the solves (float32) and the reference pass on one batch
FIXED_TOKENS = {"float32": 12900.0, "bfloat16": 22750.0}
RTN_BLOCK_S = 0.3  # at REF_GEMM_FP32
WORK_FIXED_S = 8.0  # a work's model load, cache writes and packing (5-12 s in the demo's log)
REF_GEMM_FP32 = 202.0  # GFLOP/s, one thread, where the constants were fitted
# without a measurement (QUANTSHIFT_SPEED_PROBE=off): the fitting machine's rates, 2 workers x 1 thread
REFERENCE_RATES = {"gemm_float32": 187.0, "score_float32": 485.0, "gemm_bfloat16": 1674.0, "score_bfloat16": 1200.0}
GPU_SPEEDUP = 50.0  # assumed, not measured here
REF_HIDDEN = 576
TASK_ITEM_TOKENS = 256  # rough prompt + choices tokens per scored item and shot
DEFAULT_TASK_ITEMS = 200  # evaluation.tasks.DEFAULT_LIMIT
# the bundled models' shapes (their descriptions), for when the converted checkpoint is not on disk
BUNDLED_SHAPES = {"smollm2-135m": (30, 576), "gemma3-270m": (18, 640)}


def register(app: typer.Typer) -> None:
    app.command("check")(check_cmd)


def check_cmd(
    path: Annotated[Path, typer.Argument(help="a study YAML (see studies/) or a recipe YAML (stages: [...])")],
    data_dir: Annotated[Path | None, typer.Option(help="directory with offline task data (as for run)")] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="study cache to count finished work in (default: the one `run` would use, runs/.cache)"),
    ] = None,
    device: Annotated[str | None, typer.Option(help="plan and estimate for this device: auto, cpu, cuda")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="as `run --dtype`: every model's dtype for the plan and estimate")
    ] = None,
    model: Annotated[str | None, typer.Option(help="with a recipe: the model whose memory plan to print")] = None,
    jobs: Annotated[int, typer.Option(help="as `run --jobs`: works at once, for the time estimate")] = 1,
    max_memory: Annotated[
        str | None,
        typer.Option(help="memory caps to plan within, e.g. cpu=16GiB,cuda:0=70GiB (default: what is free now)"),
    ] = None,
) -> None:
    """Validate a study or recipe file and say what it would run (works, cached results, memory
    plans, a time estimate)."""
    data = validate.read_yaml("FILE", path)
    if data_dir is not None:
        validate.check_existing_dir("--data-dir", data_dir)
    if device is not None:
        validate.check_device("--device", device)
    validate.check_max_memory("--max-memory", max_memory)
    if file_kind(data, str(path)) == "recipe":
        rec = validate.check_recipe_data(data, str(path))
        for line in describe_recipe(rec):
            typer.echo(line)
        if model is not None:
            validate.check_model_name("--model", model)
            for line in memory_lines(
                model,
                device or "auto",
                "auto",
                max_memory,
                128 * 512 if rec.needs_calibration else 0,
                rec.needs_calibration,
            ):
                typer.echo(line)
        return
    if model is not None:
        validate.fail("--model goes with a recipe file; a study names its own models")
    if device is not None and isinstance(data, dict):
        data = {**data, "device": device}
    if dtype is not None:
        validate.check_dtype("--dtype", dtype)
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            data = {
                **data,
                "models": [
                    {**m, "dtype": dtype} if isinstance(m, dict) else {"name": m, "dtype": dtype}
                    for m in data["models"]
                ],
            }
    spec = validate.check_study_data(data, str(path), data_dir, path.stem)
    cache_root = cache or Path("runs") / ".cache"
    validate.int_in("--jobs", jobs, 1, 4096)
    for line in describe_study(spec, cache_root, str(data_dir) if data_dir else None, max_memory, jobs, typer.echo):
        typer.echo(line)


def memory_lines(
    model: str,
    device: str,
    dtype: str,
    max_memory: str | None,
    calib_tokens: int,
    calibrated: bool,
    quantize: bool = True,
) -> list[str]:
    """The memory plan of quantizing and evaluating `model` (memory.py), as printed lines."""
    from .errors import ConfigError, QuantshiftError
    from .memory import plan_for_model
    from .models.load import resolve_device

    try:
        plan = plan_for_model(
            model,
            device=resolve_device(device),
            dtype=dtype,
            max_memory=max_memory,
            quantize=quantize,
            calib_tokens=calib_tokens,
            calibrated=calibrated,
        )
    except ConfigError as err:  # over the cap even streaming: what `run` would fail the model's works with
        return [f"memory plan for {model}: does not fit: {err}"]
    except QuantshiftError as err:  # e.g. a hub model whose config is not cached offline
        return [f"memory plan for {model}: unknown ({err})"]
    return plan.lines()


def file_kind(data: Any, where: str) -> str:
    """'recipe' (a stage list, or a mapping with stages) or 'study' (a mapping of study keys)."""
    from .studies.spec import StudySpec

    if isinstance(data, list):
        return "recipe"
    if not isinstance(data, dict) or not data:
        validate.fail(
            f"{where}: neither a recipe (a list of stages, or stages: [...]) nor a study "
            f"(a mapping with models, methods, calibration, evaluation); got {validate._short(data)}"
        )
    study_keys = set(StudySpec.model_fields)
    if "stages" in data:
        return "recipe"
    if any(k in study_keys for k in data):
        return "study"
    key = str(next(iter(data)))
    validate.fail(
        f"{where}: unknown key {key!r}{validate.closest(key, [*study_keys, 'stages'])}; a recipe has "
        f"stages, a study has {', '.join(sorted(study_keys))}"
    )


def describe_recipe(rec: Recipe) -> list[str]:
    from .methods import METHODS

    lines = [
        f"recipe: valid, {len(rec.stages)} stage{'s' * (len(rec.stages) != 1)}: {rec.describe()} "
        f"(digest {rec.digest()}); calibration data {'needed' if rec.needs_calibration else 'not needed'}"
    ]
    for i, stage in enumerate(rec.stages):
        cls = METHODS.get(stage.method)
        settings = stage.config.model_dump(mode="json")
        shown = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
        lines.append(
            f"  stage {i}: {stage.method} ({cls.kind}{', calibrated' if cls.needs_calibration else ''}) {shown}"
        )
    return lines


def model_shape(name: str) -> tuple[int, int, bool]:
    """(blocks, hidden size, known) from a config on disk or the bundled table; else a guess."""
    local = validate.local_model_dir(name)
    if local is not None:
        try:
            cfg = json.loads((local / "config.json").read_text())
            cfg = cfg.get("text_config", cfg)
            return int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if name in BUNDLED_SHAPES:
        return (*BUNDLED_SHAPES[name], True)
    return 30, REF_HIDDEN, False


def speed_precision(dtype: str, rates: Mapping[str, float]) -> str:
    """Which measured rate a model of this dtype computes at on this CPU: auto is bf16 where the
    probe measured bf16 (native bf16 units), else float32; bfloat16 weights count as bf16."""
    if dtype in ("auto", "bfloat16", "bf16") and "score_bfloat16" in rates:
        return "bfloat16"
    return "float32"


def work_estimate(
    work: Mapping[str, Any], pending: Sequence[Mapping[str, Any]], on_gpu: bool, rates: Mapping[str, float]
) -> tuple[float, float]:
    """(quantization seconds, evaluation seconds) of one model work, as estimated (see module doc)."""
    blocks, hidden, _ = model_shape(work["model"]["name"])
    prec = speed_precision(work["model"].get("dtype", "auto"), rates)
    e = 1.0 / (rates[f"score_{prec}"] * 30)  # s per scored token per block at the measured rate
    f = REF_GEMM_FP32 / rates["gemm_float32"]
    scale = (hidden / REF_HIDDEN) ** 2 / (GPU_SPEEDUP if on_gpu else 1.0)
    quant = 0.0
    if pending and work["recipe"] is not None:
        if work["calib"] is not None:
            parts = len(work["calib"]["source"].split("+"))
            tokens = parts * work["calib"]["n"] * work["calib"]["seqlen"]
            quant = blocks * (tokens * Q_PER_TOKEN[prec] + FIXED_TOKENS[prec]) * e * scale
        else:
            quant = blocks * RTN_BLOCK_S * f * scale
    tokens = 0
    for u in pending:
        s = u["settings"]
        if s["kind"] == "ppl":
            tokens += s["seqlen"] * (s["windows"] or 64)  # 0 = every window: counted as 64
        else:
            items = s["limit"] or DEFAULT_TASK_ITEMS
            tokens += items * TASK_ITEM_TOKENS * (s["shots"] + 1)
    fixed = WORK_FIXED_S if pending else 0.0
    return quant, blocks * tokens * e * scale + fixed


def diag_estimate(work: Mapping[str, Any], rates: Mapping[str, float]) -> float:
    """Seconds of a diagnostics work: one forward over each set's windows (see work_estimate)."""
    blocks, hidden, _ = model_shape(work["model"]["name"])
    prec = speed_precision(work["model"].get("dtype", "auto"), rates)
    tokens = len(work["sets"]) * work["settings"]["windows"] * work["settings"]["seqlen"]
    return blocks * tokens * (hidden / REF_HIDDEN) ** 2 / (rates[f"score_{prec}"] * 30) + WORK_FIXED_S


def study_rates(jobs: int, on_gpu: bool, echo: Any = None) -> tuple[dict[str, float], str]:
    """(rates, where they come from) for the estimate: this machine's, measured once and cached
    (machine_speed), or the fitting machine's when QUANTSHIFT_SPEED_PROBE=off or on a GPU."""
    if on_gpu or os.environ.get("QUANTSHIFT_SPEED_PROBE", "").lower() in ("off", "0", "no"):
        return dict(REFERENCE_RATES), "the reference machine's rates"
    from .machine_speed import machine_speed
    from .models.bundled import cache_dir

    workers = max(1, min(jobs, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    found = machine_speed(cache_dir(), workers, threads, echo)
    r = found["rates"]
    note = f"this machine's rates ({workers} x {threads} threads, measured {found.get('measured', '?')}): " + (
        f"float32 GEMM {r['gemm_float32']:.0f} GFLOP/s, scoring {r['score_float32']:.0f} tok/s"
        + (f"; bf16 {r['gemm_bfloat16']:.0f} GFLOP/s, {r['score_bfloat16']:.0f} tok/s" if "score_bfloat16" in r else "")
    )
    return dict(r), note


def describe_study(
    spec: StudySpec,
    cache_root: Path,
    data_dir: str | None,
    max_memory: str | None = None,
    jobs: int = 1,
    echo: Any = None,
) -> list[str]:
    from .models.load import resolve_device
    from .studies.cache import Cache
    from .studies.runner import all_works, needs_work, plan_study
    from .studies.work import pending_units

    on_gpu = resolve_device(spec.device).startswith("cuda")
    plan = plan_study(spec, data_dir, on_gpu=on_gpu)
    works = all_works(plan)
    cache = Cache(Path(cache_root))
    models = [w for w in works if w["kind"] == "model"]
    quant = [w for w in models if w["recipe"] is not None]
    diag = [w for w in works if w["kind"] == "diag"]
    units_total = sum(len(w["units"]) for w in models)
    pend = {w["key"]: pending_units(w, cache) for w in models}
    units_todo = sum(len(p) for p in pend.values())
    quant_done = sum(1 for w in quant if not pend[w["key"]])
    diag_done = sum(1 for w in diag if not needs_work(w, cache))
    rates, source = study_rates(jobs, on_gpu, echo)
    q_s = e_s = 0.0
    for w in models:
        q, e = work_estimate(w, pend[w["key"]], on_gpu, rates)
        q_s, e_s = q_s + q, e_s + e
    e_s += sum(diag_estimate(d, rates) for d in diag if needs_work(d, cache))
    q_s, e_s = q_s / jobs, e_s / jobs
    shapes = [model_shape(m.name) for m in spec.models]
    guessed = [m.name for m, s in zip(spec.models, shapes) if not s[2]]
    lines = [
        f"study {spec.name}: valid; {len(plan.cells)} cells -> {len(models)} distinct models "
        f"({len(quant)} quantized, {len(models) - len(quant)} fp) x {len(plan.units)} evaluation units",
        f"  quantize works: {len(quant)} ({quant_done} with every result cached, {len(quant) - quant_done} to run)",
        f"  eval units: {units_total} ({units_total - units_todo} cached, {units_todo} to run)",
        f"  diagnostics works: {len(diag)} ({diag_done} cached)",
        f"  cache: {cache_root}",
    ]
    cal = spec.calibration
    if any(w["calib"] for w in quant):
        per = ", ".join(f"{m.name}: {s[0]} blocks" for m, s in zip(spec.models, shapes))
        lines.append(f"  calibration per work: {cal.n} x {cal.seqlen} tokens per source ({cal.mode}); {per}")
        for src in cal.sources:
            if cal.mode == "tokens":
                note = validate.check_calib_budget("calibration source", src, cal.n, cal.seqlen, spec.models[0].name)
                lines.append(f"    {note}")
    cal_tokens = cal.n * cal.seqlen * max((len(src.split("+")) for src in cal.sources), default=1)
    quantizes = bool(quant)
    for m in spec.models:
        for line in memory_lines(
            m.name, spec.device, m.dtype, max_memory, cal_tokens if quantizes else 0, quantizes, quantize=quantizes
        ):
            lines.append(f"  {line}")
    lines.append(
        f"  estimate with --jobs {jobs} (per-token model for {'GPU' if on_gpu else 'CPU'}, see `quantshift.preview`): "
        f"quantization {_duration(q_s)}, evaluation {_duration(e_s)}, total {_duration(q_s + e_s)} ({q_s + e_s:.0f} s)"
        + (f"; shape of {', '.join(guessed)} unknown offline, assumed 30 blocks x {REF_HIDDEN}" if guessed else "")
    )
    lines.append(f"    from {source}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
