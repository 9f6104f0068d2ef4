"""`quantshift check STUDY.yaml|RECIPE.yaml`: validate a file and say what it would run.

A dry run: nothing is written to the run or study-cache directories (only the machine-speed
record). For a study: the works and evaluation units the runner would plan, how many the cache
already holds, and a time estimate; for a recipe: its stages with every setting resolved.

The estimate is a per-token model scaled by this machine's measured speed (machine_speed: a
float32 and a bf16 GEMM rate and smollm2-135m's scoring and decoding rates in each precision,
measured once per machine and thread layout, ~40 s, then cached). A model's cost per token is
its multiply-adds (every decoder block's linears, the output head, attention at the context
length), relative to the probe model's: a model of 18 blocks with a 262k-token head (gemma3-270m)
costs more per scored token than one of 30 blocks with a 49k head (smollm2-135m). With r = that
ratio and the rates in the precision the study's models compute in:
  perplexity            scored tokens x r / scoring rate
  tasks                 the tokens of their forwards (task_tokens: counted from the items with the
                        model's tokenizer where both are on disk, as lm-eval runs them; a chat
                        template adds CHAT_TOKENS a request) x r / scoring rate, plus generated
                        tokens (items x max_gen_toks) x decode_cost / decoding rate
  calibrated quantizing blocks x (calibration tokens x Q_PER_TOKEN + FIXED_TOKENS)[precision] x e
                        x the stages' METHOD_QUANT_FACTOR (e: a scored token's seconds per block,
                        scaled by the block's linears)
  uncalibrated (RTN)    blocks x RTN_BLOCK_S x REF_GEMM_FP32 / this machine's float32 GEMM rate
  diagnostics           their sets' tokens x r / scoring rate
  every work            WORK_FIXED_S (model load, cache writes); evaluation x ACT_QUANT_EVAL_FACTOR
                        where activations are fake-quantized
the wall time is the sum over works divided by --jobs. The constants were fitted on one machine
(benchmarks/cpu_speed.py and study runs, see docs/performance.md); the GPU factor is an assumption.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import validate

if TYPE_CHECKING:
    from .memory import ModelShape
    from .recipes import Recipe
    from .studies.spec import StudySpec

# Per block, in units of e (a scored token's seconds per block at the probe's rate). float32: fitted
# with `python benchmarks/cpu_speed.py --fit` (docs/performance.md) on a 2-core Xeon with AMX, one
# thread: GPTQ W3 g64 seconds per block at 16 and 32 x 512 calibration tokens against the scoring
# rate (500 tok/s there). bf16: from the two bf16 studies run there with --jobs 2 against the
# 2-worker probe rate (1139 tok/s): GPTQ on smollm2-135m took 1.15 s a block at 16 x 512 tokens
# (the demo) and 7.43 s at 128 x 512 (instruct-methods-reduced); --fit's two points, 16 and 32 x 512
# on one idle worker, extrapolated to 128 x 512 fell 14% short.
Q_PER_TOKEN = {"float32": 2.24, "bfloat16": 3.74}  # a calibration token: forward passes + Hessians
# what does not grow with calibration tokens: the solves (float32) and the reference pass on one batch
FIXED_TOKENS = {"float32": 12900.0, "bfloat16": 8640.0}
RTN_BLOCK_S = 0.3  # at REF_GEMM_FP32
# a calibrated stage's quantize seconds relative to GPTQ's (bf16, both bundled models, 64-128 x 512
# tokens: AWQ's scale and clip grids 1.1x, SmoothQuant W8A8's statistics and rounding 0.6x, a
# smoothing-only SmoothQuant stage's statistics 0.15x); methods not listed (SpQR, QuIP, ZeroQuant)
# are counted as GPTQ, unmeasured
METHOD_QUANT_FACTOR = {"gptq": 1.0, "awq": 1.1, "smoothquant": 0.6}
TRANSFORM_ONLY_FACTOR = {"smoothquant": 0.15, "awq": 1.1}  # the stage with quantize: false
# fake-quantized activations (abits < 16: W8A8, FP8) quantize every linear's input at every forward:
# evaluation took 1.15-1.45x the weight-only models' there
ACT_QUANT_EVAL_FACTOR = 1.3
WORK_FIXED_S = 3.0  # a work's model load and cache writes outside its quantize and evaluate seconds
REF_GEMM_FP32 = 202.0  # GFLOP/s, one thread, where the constants were fitted
# without a measurement (QUANTSHIFT_SPEED_PROBE=off): the fitting machine's rates, 2 workers x 1 thread
REFERENCE_RATES = {
    "gemm_float32": 187.0,
    "score_float32": 485.0,
    "decode_float32": 60.0,
    "gemm_bfloat16": 1674.0,
    "score_bfloat16": 1200.0,
    "decode_bfloat16": 60.0,
}
GPU_SPEEDUP = 50.0  # assumed, not measured here
REF_HIDDEN = 576
# tasks whose items cannot be read offline (lm-eval's hub tasks, undownloaded data): per item
TASK_ITEM_TOKENS = 256  # rough prompt + choices tokens per scored item and shot
CHAT_TOKENS = 30  # a chat template's turn markers and default system prompt per request (smollm2: 30)
CHARS_PER_TOKEN = 4.3  # English text in smollm2's and gemma3's tokenizers (within 5% on the local tasks)
# the bundled models' shapes (their descriptions), for when the converted checkpoint is not on disk
BUNDLED_SHAPES = {"smollm2-135m": (30, 576), "gemma3-270m": (18, 640)}
# multiply-adds per token of the probe model (smollm2-135m: 30 blocks of 3.54M, a 49152 x 576
# head), attention at the probe's mean context of 256: the unit the rates are measured in
PROBE_BLOCK_MACS = 3_538_944
PROBE_VOCAB = 49152
PROBE_CONTEXT = 256


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
            shape=read_shape(model),
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


@cache
def read_shape(name: str) -> ModelShape | None:
    """The model's shape from its config (memory.model_shape), read once per check; None where the
    config is not on disk (asking the hub offline costs ~25 s of retries) or cannot be read."""
    from .errors import QuantshiftError
    from .memory import model_shape as full_shape
    from .models.bundled import BUNDLED

    if name not in BUNDLED and validate.local_model_dir(name) is None and not hub_cached(name):
        return None
    try:
        return full_shape(name)
    except (QuantshiftError, OSError, ValueError):
        return None


def model_costs(name: str) -> tuple[int, float, float]:
    """(blocks, one block's linear multiply-adds per token, the head's) from the model's config; a
    shape guessed from the hidden size (smollm2's proportions) where the config cannot be read."""
    shape = read_shape(name)
    if shape is not None:
        return shape.blocks, shape.linear_params / shape.blocks, float(shape.vocab * shape.hidden)
    blocks, hidden, _ = model_shape(name)
    return blocks, PROBE_BLOCK_MACS * (hidden / REF_HIDDEN) ** 2, PROBE_VOCAB * hidden


def hub_cached(name: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 (not a repo id, or no hub library: not cached)
        return False


def token_macs(blocks: int, block: float, head: float, hidden: int, context: float) -> float:
    """Multiply-adds of one token: every block's linears and attention over `context`, and the head."""
    return blocks * (block + 2 * context * hidden) + head


def token_cost(name: str, context: float) -> float:
    """A token of this model at this mean context, in units of a probe-model scored token."""
    blocks, block, head = model_costs(name)
    _, hidden, _ = model_shape(name)
    probe = token_macs(30, PROBE_BLOCK_MACS, PROBE_VOCAB * REF_HIDDEN, REF_HIDDEN, PROBE_CONTEXT)
    return token_macs(blocks, block, head, hidden, context) / probe


def decode_cost(name: str, context: float) -> float:
    """A generated token of this model, in units of a probe-model generated token. A decoding step
    (8 sequences, a token each) of a small model is about half per-block overhead and half
    multiply-adds: fitted on the two bundled models (gemma3-270m decodes 1.35x slower than
    smollm2-135m here, its multiply-adds are 1.9x); for large models the multiply-adds dominate."""
    blocks, _, _ = model_costs(name)
    return 0.5 * blocks / 30 + 0.5 * token_cost(name, context)


def text_tokens(text: str) -> float:
    """Tokens a text takes, roughly: ASCII characters / CHARS_PER_TOKEN; digits (split one per token
    by these tokenizers) and other characters one each. For models whose tokenizer is not on disk."""
    words = sum(1 for c in text if c < "\x80" and not c.isdigit())
    return words / CHARS_PER_TOKEN + (len(text) - words)


@cache
def token_counter(model: str) -> Callable[[str], float]:
    """Counts a text's tokens with the model's own tokenizer where it is on disk (bundled, local or
    cached hub models; nothing is downloaded), else with text_tokens."""
    try:
        from transformers import AutoTokenizer

        local = validate.local_model_dir(model)
        tok = AutoTokenizer.from_pretrained(str(local or model), local_files_only=True)
    except Exception:  # noqa: BLE001 (any failure to read a tokenizer: count characters instead)
        return text_tokens
    return lambda text: float(len(tok(text, add_special_tokens=False)["input_ids"]))


def task_tokens(
    settings: Mapping[str, Any], data_dir: str | None, count: Callable[[str], float] = text_tokens
) -> tuple[float, float, float]:
    """(scored tokens, generated tokens, mean forward length) of one task unit, counted from the
    task's items where they are on disk, as lm-eval computes them: a multiple-choice item is one
    forward of prompt (with its shots) and answer per choice, except that choices of one token share
    a forward (lm-eval's logits cache: requests whose input, the continuation's last token off, is
    the same); a generation item is its prompt and up to max_gen_toks generated tokens. Tasks whose
    items cannot be read offline: TASK_ITEM_TOKENS per item and shot."""
    from .evaluation.tasks import DEFAULT_LIMIT, TASKS, item_text, task_data

    limit = settings.get("limit")
    limit = DEFAULT_LIMIT if limit is None else (limit or None)
    shots = settings["shots"]
    chat = CHAT_TOKENS if settings.get("chat_template") else 0
    name = settings["task"]
    task = TASKS.get(name) if name in TASKS else None
    if task is not None and (task.needs == "" or (task.needs == "data-dir" and data_dir)):
        try:
            data = task_data(name, data_dir)
        except Exception:  # noqa: BLE001 (unreadable data fails the run with its own message; here: guess)
            data = None
        if data is not None and data.test:
            scored_items = data.scored(limit)
            pool = data.pool[:20]
            shot = sum(count(item_text(task, it) + task.fewshot_delimiter) for it in pool) / len(pool) if pool else 0.0
            context = count(task.preamble) + shots * shot + chat
            scored = generated = 0.0
            forwards = 0
            for it in scored_items:
                prompt = context + count(it["query"])
                if task.kind == "mc":
                    answers = [count(task.target_delimiter + c) for c in it["choices"]]
                    shared = any(n <= 1 for n in answers)  # the one-token choices' forward: the prompt
                    scored += sum(prompt + n - 1 for n in answers if n > 1) + (prompt if shared else 0)
                    forwards += sum(1 for n in answers if n > 1) + shared
                else:
                    scored += prompt
                    generated += task.max_gen_toks
                    forwards += 1
            return scored, generated, scored / max(1, forwards)
    n_items = limit or DEFAULT_LIMIT
    return n_items * (TASK_ITEM_TOKENS * (shots + 1) + chat), 0.0, float(TASK_ITEM_TOKENS * (shots + 1))


@cache
def model_task_tokens(model: str, settings_json: str, data_dir: str | None) -> tuple[float, float, float]:
    """task_tokens with the model's tokenizer, counted once per model and unit (a study's works of
    one model share their units)."""
    return task_tokens(json.loads(settings_json), data_dir, token_counter(model))


def speed_precision(dtype: str, rates: Mapping[str, float]) -> str:
    """Which measured rate a model of this dtype computes at on this CPU: auto is bf16 where the
    probe measured bf16 (native bf16 units), else float32; bfloat16 weights count as bf16."""
    if dtype in ("auto", "bfloat16", "bf16") and "score_bfloat16" in rates:
        return "bfloat16"
    return "float32"


def work_estimate(
    work: Mapping[str, Any],
    pending: Sequence[Mapping[str, Any]],
    on_gpu: bool,
    rates: Mapping[str, float],
    data_dir: str | None = None,
) -> tuple[float, float]:
    """(quantization seconds, evaluation seconds) of one model work, as estimated (see module doc)."""
    name = work["model"]["name"]
    blocks, block_macs, _ = model_costs(name)
    prec = speed_precision(work["model"].get("dtype", "auto"), rates)
    score = rates[f"score_{prec}"] * (GPU_SPEEDUP if on_gpu else 1.0)
    decode = rates.get(f"decode_{prec}", REFERENCE_RATES[f"decode_{prec}"]) * (GPU_SPEEDUP if on_gpu else 1.0)
    quant = 0.0
    stages = [next(iter(st.items())) for st in work["recipe"]["stages"]] if work["recipe"] is not None else []
    if pending and stages:
        from .methods import METHODS

        rtn = blocks * RTN_BLOCK_S * REF_GEMM_FP32 / rates["gemm_float32"] * block_macs / PROBE_BLOCK_MACS
        rtn /= GPU_SPEEDUP if on_gpu else 1.0
        calibrated = [(m, cfg) for m, cfg in stages if m in METHODS and METHODS.get(m).needs_calibration]
        if work["calib"] is not None and calibrated:
            parts = len(work["calib"]["source"].split("+"))
            tokens = parts * work["calib"]["n"] * work["calib"]["seqlen"]
            e = block_macs / PROBE_BLOCK_MACS / (score * 30)  # s per calibration token per block
            once = blocks * (tokens * Q_PER_TOKEN[prec] + FIXED_TOKENS[prec]) * e
            quant = once * sum(
                METHOD_QUANT_FACTOR.get(m, 1.0) if cfg.get("quantize", True) else TRANSFORM_ONLY_FACTOR.get(m, 1.0)
                for m, cfg in calibrated
            )
        else:
            quant = rtn
    # a transform-only stage's abits (its default, 8) quantize nothing
    act_quant = any(int(cfg.get("abits", 16)) < 16 and cfg.get("quantize", True) for _, cfg in stages)
    slower = ACT_QUANT_EVAL_FACTOR if act_quant else 1.0
    seconds = 0.0
    for u in pending:
        s = u["settings"]
        if s["kind"] == "ppl":
            tokens = s["seqlen"] * (s["windows"] or 64)  # 0 = every window: counted as 64
            seconds += tokens * token_cost(name, s["seqlen"] / 2) / score
        else:
            scored, generated, length = model_task_tokens(name, json.dumps(s, sort_keys=True), data_dir)
            seconds += scored * token_cost(name, length / 2) / score
            seconds += generated * decode_cost(name, length) / decode
    fixed = WORK_FIXED_S if pending else 0.0
    return quant, seconds * slower + fixed


def diag_estimate(work: Mapping[str, Any], rates: Mapping[str, float]) -> float:
    """Seconds of a diagnostics work: one forward over each set's windows (see work_estimate)."""
    name = work["model"]["name"]
    prec = speed_precision(work["model"].get("dtype", "auto"), rates)
    tokens = len(work["sets"]) * work["settings"]["windows"] * work["settings"]["seqlen"]
    return tokens * token_cost(name, work["settings"]["seqlen"] / 2) / rates[f"score_{prec}"] + WORK_FIXED_S


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
        q, e = work_estimate(w, pend[w["key"]], on_gpu, rates, data_dir)
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
