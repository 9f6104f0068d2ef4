"""The public Python API: one verb per job, as short as the CLI, which is a thin shell over it.

    result = quantize(model, "gptq", calib=texts, tokenizer=tok, wbits=4, group_size=128)
    metrics = result.evaluate(ppl=["wikipedia"])        # == evaluate(result, ppl=[...])
    result.export("out/ct", format="compressed-tensors")
    summary = run_study("studies/offline-cross-domain.yaml")

`model` is a Hugging Face causal LM held in memory (quantized in place; pass its `tokenizer=`),
or a name: a bundled alias ("smollm2-135m"), a local directory or a hub id. Options are checked
here, before any model loads, so a typo costs nothing. dtype and device "auto" mean what they
mean on the command line (models.precision.resolve_precision).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .config import user_path
from .data.calibset import CalibManifest, CalibSet, build_calibset, ids_sha256, sample_windows
from .errors import ConfigError, DataError, ModelError
from .memory import plan_for_model as memory_plan
from .models.load import LoadedModel, load_model, resolve_device
from .models.precision import resolve_precision
from .pipeline import PipelineRun
from .recipes import Recipe, load_recipe, make_stage, recipe_from_dict

if TYPE_CHECKING:
    from .quant.statstore import StatsStore

__all__ = ["QuantizationResult", "evaluate", "export", "load", "memory_plan", "quantize", "run_study", "save"]

CALIB_NSAMPLES = 128  # windows drawn from a source, a text list or a token stream by default
CALIB_SEQLEN = 512

ModelLike = Any  # nn.Module (a Hugging Face PreTrainedModel), str/Path name, LoadedModel or QuantizationResult


@dataclass
class QuantizationResult:
    """A quantized model and how it was made.

    model: the Hugging Face model, fake-quantized in place (the caller's object when one was
    given); report: the engine's per-layer report (errors, timings, formats); precision: the
    resolved precision the model holds and computes in, e.g. "float32" or "bfloat16" (with
    device, part of a result's identity); path: the quantized directory it was saved to or
    loaded from, if any."""

    model: nn.Module
    tokenizer: Any
    recipe: Recipe
    report: dict
    calibration: dict | None
    precision: str
    path: Path | None = None
    device: str = "cpu"  # where it computed (quantize) or was loaded to (load)
    loaded: LoadedModel = field(repr=False, default=None)  # type: ignore[assignment]
    run: PipelineRun | None = field(repr=False, default=None)  # None when loaded from a directory

    def __repr__(self) -> str:  # the model and report are too big to print
        cal = self.calibration
        where = f"{cal['source']} {cal['n']}x{cal['seqlen']}" if cal else None
        return (
            f"QuantizationResult({self.recipe.describe()}, precision={self.precision!r}, device={self.device!r}, "
            f"calibration={where!r}, modules={len(self.report.get('modules', {}))}, path={self.path!r})"
        )

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return save(self, path, overwrite=overwrite)

    def export(self, path: str | Path, format: str = "compressed-tensors", **options: Any) -> Path:
        return export(self, path, format, **options)

    def evaluate(self, ppl: str | Iterable[str] = (), tasks: str | Iterable = (), **options: Any) -> dict[str, dict]:
        return evaluate(self, ppl, tasks, **options)


# ---- models --------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _compute_device(model: ModelLike, device: str | None) -> str:
    """None: a model held in memory and already on an accelerator stays there; otherwise "auto"."""
    module = model.model if isinstance(model, (QuantizationResult, LoadedModel)) else model
    if device is None and isinstance(module, nn.Module) and _model_device(module).type != "cpu":
        return str(_model_device(module))
    return resolve_device(device or "auto")


def _wrap(model: nn.Module, tokenizer: Any, dtype: str, compute_device: str, place: bool) -> LoadedModel:
    """An in-memory model in the precision `dtype` resolves to on `compute_device` (as load_model
    would load it); with `place`, moved there too (evaluation runs where the weights are)."""
    precision = resolve_precision(dtype, compute_device)
    if next(model.parameters()).dtype != precision.weights:
        model.to(dtype=precision.weights)
    if place and _model_device(model) != torch.device(compute_device):
        model.to(compute_device)
    return LoadedModel.from_hf(model.eval(), tokenizer, precision=precision)


def _rewrap(loaded: LoadedModel, dtype: str, compute_device: str, place: bool) -> LoadedModel:
    if loaded.source is not None:  # weights on disk: they materialize in the precision they were loaded for
        return loaded
    fresh = _wrap(loaded.model, loaded.tokenizer, dtype, compute_device, place)
    return replace(loaded, precision=fresh.precision)  # keeps name, path and quant_info


def _as_loaded(
    model: ModelLike,
    tokenizer: Any,
    device: str | None,
    dtype: str,
    *,
    place: bool,
    weights_device: str | None = None,
    backend: str = "fake",
    head: str = "float",
    stream: bool = False,
) -> LoadedModel:
    """Any accepted model form -> LoadedModel. Names load as the CLI loads them: onto
    `weights_device` (default: the compute device) in the precision "auto" means there."""
    dev = _compute_device(model, device)
    if head != "float" and not isinstance(model, (str, Path)):
        raise ConfigError(f"head={head!r} loads a quantized directory by its path; this model is already in memory")
    if isinstance(model, QuantizationResult):
        model = model.loaded
    if isinstance(model, LoadedModel):
        _no_tokenizer(tokenizer, "an already loaded model")
        if model.packing is not None:  # packed kernels compute in the types they were built with: as loaded
            return model
        return _rewrap(model, dtype, dev, place)
    if isinstance(model, (str, Path)):
        _no_tokenizer(tokenizer, "a model name, which loads its own tokenizer")
        return load_model(
            str(model),
            device=dev if stream else (weights_device or dev),
            dtype=dtype,
            compute_device=dev,
            backend=backend,
            head=head,
            stream=stream,
        )
    if backend != "fake":
        raise ConfigError("backend='packed' loads a quantized directory by its path; this model is already in memory")
    if isinstance(model, nn.Module):
        return _wrap(model, tokenizer, dtype, dev, place)
    raise ConfigError(
        f"model must be a Hugging Face model, a name or path, or a QuantizationResult; got {type(model).__name__}"
    )


def _no_tokenizer(tokenizer: Any, what: str) -> None:
    if tokenizer is not None:
        raise ConfigError(f"tokenizer= goes with an in-memory Hugging Face model, not with {what}")


def _need_tokenizer(tokenizer: Any, why: str) -> None:
    if tokenizer is None:
        raise ConfigError(f"{why} needs the model's tokenizer: pass tokenizer= with an in-memory model")


# ---- recipes and calibration ----------------------------------------------------------------


def as_recipe(recipe: Recipe | dict | list | str | Path, options: dict[str, Any] | None = None) -> Recipe:
    """A Recipe, its dict/list form, a YAML path, or method name(s) with options.

    Options go with a method name: each goes to the stages of a "smoothquant,gptq" list whose
    config has it; one that no stage has is an error naming it and the allowed keys."""
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if isinstance(recipe, str) and not _looks_like_file(recipe):
        return _method_recipe(recipe, opts)
    if opts:
        raise ConfigError(
            f"method options ({', '.join(sorted(opts))}) go with a method name; put them in the recipe instead"
        )
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (dict, list)):
        return recipe_from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    raise ConfigError(f"recipe must be a Recipe, a dict, a YAML path or a method name; got {type(recipe).__name__}")


def _looks_like_file(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or user_path(text).is_file()


def _method_recipe(spec: str, opts: dict[str, Any]) -> Recipe:
    from .methods import METHODS

    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"recipe {spec!r} names no method")
    classes = [METHODS.get(n) for n in names]  # an unknown name fails here with the allowed ones
    known = {k for c in classes for k in c.Config.model_fields}
    stages = []
    for i, (name, cls) in enumerate(zip(names, classes, strict=True)):
        # a key no stage knows goes to the first one, whose strict config names it
        mine = {k: v for k, v in opts.items() if k in cls.Config.model_fields or (i == 0 and k not in known)}
        stages.append(make_stage(name, mine))
    return Recipe(tuple(stages))


def _texts_calibset(texts: list[str], loaded: LoadedModel, n: int, seqlen: int, seed: int) -> CalibSet:
    """A user's texts, joined and cut into n seeded windows like a named source's calibration part."""
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("calib as a list must hold strings (texts to calibrate on)")
    tok: Any = loaded.tokenizer
    _need_tokenizer(tok, "calibration on texts")
    ids = tok("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    stream = torch.tensor(ids, dtype=torch.int64)
    bos = tok.bos_token_id if loaded.needs_bos else None
    rows = sample_windows(stream, n, seqlen, seed, bos, f"calib (a list of {len(texts)} texts)")
    return CalibSet(rows, _manifest(f"texts[{len(texts)}]", seed, rows, loaded))


def _manifest(source: str, seed: int, ids: torch.Tensor, loaded: LoadedModel, split: str = "given") -> CalibManifest:
    n, seqlen = ids.shape
    return CalibManifest(
        source=source,
        split=split,
        seed=seed,
        n=n,
        seqlen=seqlen,
        tokens=ids.numel(),
        tokenizer=getattr(loaded.tokenizer, "name_or_path", "") or loaded.name,
        sha256=ids_sha256(ids),
    )


def _calibset(
    calib: Any, loaded: LoadedModel, nsamples: int | None, seqlen: int | None, seed: int, data_dir: str | Path | None
) -> CalibSet:
    n, sl = nsamples or CALIB_NSAMPLES, seqlen or CALIB_SEQLEN
    if n <= 0 or sl <= 1:
        raise DataError(f"calibration needs nsamples >= 1 and seqlen >= 2, got nsamples={n}, seqlen={sl}")
    if isinstance(calib, CalibSet):
        _check_shape(calib.input_ids, nsamples, seqlen)
        return calib
    if isinstance(calib, torch.Tensor):
        ids = calib.detach().to("cpu", torch.int64)
        if ids.dim() == 1:  # a token stream: windows are drawn from it like from a text source
            bos = getattr(loaded.tokenizer, "bos_token_id", None) if loaded.needs_bos else None
            rows = sample_windows(ids, n, sl, seed, bos, f"calib (a stream of {ids.numel()} tokens)")
            return CalibSet(rows, _manifest("tokens", seed, rows, loaded))
        if ids.dim() != 2:
            raise ConfigError(
                f"calib token ids must be [n, seqlen] windows or a 1-D stream, got shape {tuple(ids.shape)}"
            )
        _check_shape(ids, nsamples, seqlen)
        return CalibSet(ids, _manifest("tokens", seed, ids, loaded))
    if isinstance(calib, (list, tuple)):
        return _texts_calibset(list(calib), loaded, n, sl, seed)
    if isinstance(calib, (str, Path)):
        _need_tokenizer(loaded.tokenizer, f"calibration source {str(calib)!r}")
        return build_calibset(
            str(calib),
            loaded.tokenizer,
            n,
            sl,
            seed,
            add_bos=loaded.needs_bos,
            tokenizer_name=loaded.name,
            data_dir=str(data_dir) if data_dir else None,
        )
    raise ConfigError(
        f"calib must be a source name, a list of texts, token ids or a CalibSet; got {type(calib).__name__}"
    )


def _check_shape(ids: torch.Tensor, nsamples: int | None, seqlen: int | None) -> None:
    """Given windows are used as they are: a differing nsamples/seqlen would be silently ignored."""
    n, sl = ids.shape
    if (nsamples is not None and nsamples != n) or (seqlen is not None and seqlen != sl):
        raise ConfigError(
            f"calib holds {n} x {sl} token windows; nsamples={nsamples}, seqlen={seqlen} disagree "
            "(leave them out for given windows)"
        )


def _check_before_load(
    rec: Recipe, *, nsamples: int | None, seqlen: int | None, seed: int, batch_size: int, dtype: str, device: str | None
) -> None:
    """The CLI's checks of a recipe and the run's numbers (validate.py), before any model loads:
    a bad regex, a negative group size or a zero batch is one ConfigError, not a failure mid-run."""
    from . import validate

    validate.check_recipe(rec)
    if nsamples is not None:
        validate.int_in("nsamples", nsamples, 1, validate.MAX_COUNT)
    if seqlen is not None:
        validate.int_in("seqlen", seqlen, 2, validate.MAX_SEQLEN)
    validate.check_seed("seed", seed)
    validate.int_in("batch_size", batch_size, 1, validate.MAX_BATCH)
    validate.check_dtype("dtype", dtype)
    if device is not None:
        validate.check_device("device", device)


def _stats_store(model: ModelLike, loaded: LoadedModel, stats_cache: str | Path) -> StatsStore:
    from .quant.statstore import StatsStore
    from .studies.keys import model_identity
    from .studies.spec import ModelAxis, digest

    if not isinstance(model, (str, Path)):
        raise ConfigError(
            "stats_cache needs the model by name or path: its statistics are keyed by the model's identity"
        )
    # keyed like a study's cache: a local model directory by a fingerprint of its files
    return StatsStore(
        Path(stats_cache), digest({"model": model_identity(ModelAxis(name=str(model))), "dtype": loaded.precision.name})
    )


def _show_plan(plan: Any, progress: bool) -> None:
    if progress and plan is not None:
        import sys

        for line in plan.lines():
            print(line, file=sys.stderr)


# ---- the verbs ------------------------------------------------------------------------------


def quantize(
    model: ModelLike,
    recipe: Recipe | dict | list | str | Path,
    calib: Any = None,
    *,
    tokenizer: Any = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 42,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    propagate: str = "quantized",
    stats_cache: str | Path | None = None,
    activations: str = "auto",
    progress: bool = True,
    out: str | Path | None = None,
    overwrite: bool = False,
    max_memory: Any = None,
    **method_options: Any,
) -> QuantizationResult:
    """Quantize `model` with `recipe`, calibrating on `calib` when the recipe needs it.

    recipe: a Recipe, a dict ({"stages": [{"gptq": {"wbits": 4}}]}), a YAML path, or a method name
    ("gptq", or "smoothquant,gptq") whose options follow as keywords (wbits=4, group_size=128).
    calib: a source name ("wikipedia", "news+pydocs", a .txt/.jsonl path, "task:<name>"), a list
    of texts, token ids ([n, seqlen] windows or a 1-D stream) or a CalibSet; sources, texts and
    streams give `nsamples` windows of `seqlen` tokens (default 128 x 512) drawn with `seed`.
    device: where blocks compute ("auto": a GPU if there is one; None also keeps an in-memory
    model's accelerator). A named model's weights load on the CPU and move a block at a time.
    dtype: "auto" resolves per machine as on the CLI; an in-memory model is converted to it.
    propagate, stats_cache, activations, batch_size: as `quantshift quantize --help` says.
    out: also save the quantized directory there (`overwrite` an existing one). max_memory:
    the memory cap ("cpu=16GiB,cuda:0=70GiB"; default what is free): a named model that does
    not fit streams from disk a block at a time and is written to `out` as it is quantized
    (out is then required); the result's model is then on disk too (see memory.py).
    """
    from . import validate
    from .pipeline import quantize_model

    validate.check_propagation(propagate, activations, stats_cache)  # the CLI's checks, worded as its flags
    rec = as_recipe(recipe, method_options)
    _check_before_load(
        rec, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size, dtype=dtype, device=device
    )
    if rec.needs_calibration and calib is None:
        raise ConfigError(
            f"recipe {rec.describe()} needs calibration data: pass calib= (a source name such as "
            "'wikipedia', a list of texts, token ids or a CalibSet)"
        )
    if rec.needs_calibration and isinstance(calib, (str, Path)):  # a source name or file: the CLI's --calib check
        from . import validate

        validate.check_source("calib", calib, data_dir)
    if isinstance(model, QuantizationResult):
        raise ConfigError(
            "this model is already quantized; to stack methods, quantize the original with a recipe of stages"
        )
    dev = _compute_device(model, device)
    plan = None
    if isinstance(model, (str, Path)):
        parts = len(str(calib).split("+")) if isinstance(calib, str) else 1
        tokens = (nsamples or CALIB_NSAMPLES) * (seqlen or CALIB_SEQLEN) * parts if rec.needs_calibration else 0
        plan = memory_plan(
            model,
            device=dev,
            dtype=dtype,
            max_memory=max_memory,
            calib_tokens=tokens,
            calibrated=rec.needs_calibration,
            evaluate=False,
        )
        _show_plan(plan, progress)
    stream = plan is not None and plan.streams("quantize")
    if stream and out is None:
        assert plan is not None
        raise ConfigError(
            f"{model} needs ~{plan.stage('quantize').host / 2**30:.1f} GiB to quantize in memory, over the "
            "memory cap: it streams from disk, so pass out= to write the quantized directory as it goes"
        )
    # like the CLI: a named model's weights stay on the CPU (or on disk), the engine moves one block at a time
    loaded = _as_loaded(model, tokenizer, dev, dtype, place=False, weights_device="cpu", stream=stream)
    loaded.memory = plan
    cal = _calibset(calib, loaded, nsamples, seqlen, seed, data_dir) if rec.needs_calibration else None
    store = _stats_store(model, loaded, stats_cache) if stats_cache is not None else None
    if stream:
        from .pipeline import quantize_streaming

        assert out is not None and plan is not None
        run = quantize_streaming(
            loaded,
            rec,
            cal,
            Path(out),
            device=dev,
            batch_size=batch_size,
            progress=progress,
            propagate=propagate,
            stats_store=store,
            activations=activations,
            overwrite=overwrite,
            max_shard_bytes=plan.shard_bytes,
        )
        written = load_model(str(out), device=dev, dtype=dtype, stream=True)  # the quantized model stays on disk
        written.memory = plan
        return QuantizationResult(
            written.model,
            written.tokenizer,
            rec,
            run.report(),
            run.calibration,
            run.precision,
            path=Path(out),
            device=dev,
            loaded=written,
            run=run,
        )
    run = quantize_model(
        loaded,
        rec,
        cal,
        device=dev,
        batch_size=batch_size,
        progress=progress,
        propagate=propagate,
        stats_store=store,
        activations=activations,
    )
    # what a saved directory's quantshift.json would tell evaluation (its calibration leakage guard)
    loaded.quant_info = {"recipe": rec.to_dict(), "calibration": run.calibration, "base_model": loaded.name}
    result = QuantizationResult(
        loaded.model,
        loaded.tokenizer,
        rec,
        run.report(),
        run.calibration,
        run.precision,
        device=dev,
        loaded=loaded,
        run=run,
    )
    if out is not None:
        save(result, out, overwrite=overwrite)
    return result


def evaluate(
    model: ModelLike,
    ppl: str | Iterable[str] = (),
    tasks: str | Iterable = (),
    *,
    suite: str | None = None,
    shots: int | Sequence[int] | None = None,
    limit: int | None = None,
    tokenizer: Any = None,
    data_dir: str | Path | None = None,
    seqlen: int = 512,
    max_windows: int | None = 64,
    batch_size: int = 4,
    seed: int = 1234,
    device: str | None = None,
    dtype: str = "auto",
    progress: bool = True,
    mt_bench: str | Path | None = None,
    judge: str | None = None,
    max_new_tokens: int = 256,
    json_out: str | Path | None = None,
    backend: str = "fake",
    head: str = "float",
    max_memory: Any = None,
    chat_template: str = "off",
) -> dict[str, dict]:
    """Perplexity on text sources, tasks (quantshift's or lm-eval's names, multiple choice by
    log-likelihood) and MT-Bench-style judged dialogue -> the `metrics` map `quantshift eval
    --json` writes: {"ppl:<source>": {"ppl", "tokens", "windows", "seqlen", ...},
    "task:<name>@<shots>": {"acc", "acc_ci", ..., "n"}, ...}.

    ppl / tasks: names or comma-separated strings; shots: an int or a list, applied to every task
    (default: each task's own count where it has one, as BOSS's tasks do, else the
    suite's, else 0); limit: items per task (None: 200 for quantshift's tasks, all for lm-eval's;
    0: all); max_windows: perplexity windows per source (None or 0: all). json_out: also write
    the CLI's JSON there, item-level samples beside it (<stem>.samples.jsonl). backend: a quantized
    directory as fake-quant float weights ("fake") or with packed low-bit kernels ("packed"); head:
    with "packed", the output projection as stored ("float") or in int8 ("int8"). max_memory: the
    memory cap (see quantize): a named model that does not fit stays on disk; perplexity then
    runs block by block over all windows, tasks through accelerate's offload hooks.
    chat_template: "off" (raw prompts, the default), "auto" (the tokenizer's chat template when it
    has one) or "on" (it must): task prompts as a chat, few-shot examples as earlier turns."""
    from .evaluation import judge as mtb
    from .evaluation import run as ev

    ppl_list, task_list = _names(ppl), _names(tasks)
    if chat_template not in ev.CHAT_TEMPLATE_MODES:
        raise ConfigError(f"--chat-template must be {', '.join(ev.CHAT_TEMPLATE_MODES)}, got {chat_template!r}")
    if not ppl_list and not task_list and not suite and mt_bench is None:
        raise ConfigError(
            "nothing to evaluate: give perplexity sources (--ppl), tasks (--tasks), a suite (--suite) "
            "or MT-Bench questions (--mt-bench)"
        )
    questions = None
    if mt_bench is not None or judge is not None:
        if mt_bench is None or judge is None:
            raise ConfigError("--mt-bench QUESTIONS.jsonl and --judge SPEC go together")
        mtb.check_judge_spec(judge)
        questions = mtb.load_questions(mt_bench, limit or None)
    if suite is not None:
        from .evaluation.tasks import SUITES

        SUITES.get(suite)  # unknown names fail here, before the model loads
    # None: each task's own count (BOSS), else the suite's, else 0; given: those counts for every task
    shot_list = [shots] if isinstance(shots, int) else list(shots) if shots is not None else None
    if shot_list is not None and any(k < 0 for k in shot_list):
        raise ConfigError("--shots must be >= 0")
    ev.preflight(tasks=task_list, suite=suite, data_dir=data_dir)
    plan = None
    if isinstance(model, (str, Path)):
        plan = memory_plan(
            model,
            device=device,
            dtype=dtype,
            max_memory=max_memory,
            quantize=False,
            batch_size=batch_size,
            seqlen=seqlen,
            max_windows=max_windows,
            backend=backend,
        )
        _show_plan(plan, progress)
    stream = plan is not None and plan.streams("evaluate")
    loaded = _as_loaded(model, tokenizer, device, dtype, place=True, backend=backend, head=head, stream=stream)
    if plan is not None:
        loaded.memory = plan
    for line in loaded.packing.lines() if loaded.packing is not None else []:
        print(line)  # which kernel each linear got, and every fallback: part of the result, not progress
    if isinstance(model, QuantizationResult):  # its model may now be in another precision or place
        model.loaded, model.precision = loaded, loaded.precision.name
        model.device = str(loaded.device if loaded.source is not None else _model_device(loaded.model))
    res = ev.EvalResult()
    if ppl_list or task_list or suite:  # MT-Bench alone is fine too
        res = ev.evaluate(
            loaded,
            ppl=ppl_list,
            tasks=task_list,
            suite=suite,
            shots=shot_list,
            limit=limit,
            data_dir=data_dir,
            seqlen=seqlen,
            max_windows=max_windows or None,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            chat_template=chat_template,
        )
    if questions is not None and judge is not None:
        ev.dispatch_streamed(loaded)
        metric, rows = mtb.mt_bench(
            loaded,
            questions,
            mtb.make_judge(judge, device or "auto"),
            judge,
            max_new_tokens,
            progress=progress,
            seed=seed,
        )
        metric["questions"] = str(mt_bench)
        res.metrics[mtb.METRIC_KEY], res.samples[mtb.METRIC_KEY] = metric, rows
    if json_out is not None:
        _write_eval_json(res, Path(json_out), model, loaded)
    return res.metrics


def _names(value: str | Iterable) -> list:
    """ "a,b" or ["a", "b"] -> ["a", "b"]; task definitions pass through."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [x.strip() if isinstance(x, str) else x for x in items if not isinstance(x, str) or x.strip()]


def _write_eval_json(res: Any, path: Path, model: ModelLike, loaded: LoadedModel) -> Path:
    from importlib.metadata import version

    from .checkpoint import versions

    info = loaded.quant_info
    return res.write(
        path,
        {
            "model": str(model) if isinstance(model, (str, Path)) else loaded.name,
            "path": loaded.path,
            "lm_eval": version("lm-eval"),
            "quantization": info and {k: info.get(k) for k in ("recipe", "calibration", "base_model")},
            "versions": versions(),
        },
    )


def save(
    obj: QuantizationResult | nn.Module, path: str | Path, *, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """A quantized model directory (what `quantshift quantize --out` writes; `load`, `evaluate`
    and `export` read it), or a plain Hugging Face checkpoint for an unquantized model."""
    from .checkpoint import staged_directory

    out = Path(path)
    if isinstance(obj, QuantizationResult):
        _no_tokenizer(tokenizer, "a QuantizationResult, which holds its own")
        _need_tokenizer(obj.tokenizer, "saving")
        if obj.run is None or obj.loaded.source is not None:  # a directory on disk already: copy it
            if obj.path is None:
                raise ModelError("this result has neither its quantization run nor a directory to copy")
            with staged_directory(out, overwrite) as tmp:
                shutil.copytree(obj.path, tmp, dirs_exist_ok=True)
        else:
            from .pipeline import save as save_run

            save_run(obj.loaded, obj.run, out, overwrite=overwrite)
        obj.path = out
        return out
    if isinstance(obj, nn.Module):
        with staged_directory(out, overwrite) as tmp:
            obj.save_pretrained(tmp)  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return out
    raise ConfigError(f"save takes a QuantizationResult or a Hugging Face model; got {type(obj).__name__}")


def load(
    path: str | Path, *, device: str | None = None, dtype: str = "auto", max_memory: Any = None
) -> QuantizationResult | tuple[Any, Any]:
    """A quantized directory -> QuantizationResult (recipe, report and calibration from its files);
    any other model (name or path) -> (model, tokenizer). Loaded as `quantshift eval` loads it;
    a quantized directory that does not fit `max_memory` stays on disk (evaluate streams it)."""
    import json

    from .checkpoint import REPORT_FILE, is_quantized_dir

    dev = resolve_device(device or "auto")
    plan = None
    if is_quantized_dir(path):
        plan = memory_plan(path, device=dev, dtype=dtype, max_memory=max_memory, quantize=False)
    loaded = load_model(str(path), device=dev, dtype=dtype, stream=plan is not None and plan.streams("evaluate"))
    loaded.memory = plan
    info = loaded.quant_info
    if info is None:
        return loaded.model, loaded.tokenizer
    report_path = Path(loaded.path) / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return QuantizationResult(
        loaded.model,
        loaded.tokenizer,
        recipe_from_dict(info["recipe"], f"{path}: recipe"),
        report,
        info.get("calibration"),
        loaded.precision.name,
        Path(loaded.path),
        device=dev,
        loaded=loaded,
    )


def export(
    source: QuantizationResult | str | Path,
    path: str | Path,
    format: str = "compressed-tensors",
    *,
    dtype: str = "auto",
    gptq_version: int = 1,
    allow_unservable: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model in a serving format: "compressed-tensors", "gptq" or "fp8".
    `source`: a QuantizationResult (saved first to a temporary directory if it never was) or a
    quantized directory. dtype: of scales and float tensors ("auto": bf16 if the base model was)."""
    from .exporters import export as export_dir
    from .exporters.common import ExportError

    def from_dir(src: str | Path) -> Path:
        return export_dir(
            src,
            format,
            path,
            dtype=dtype,
            gptq_version=gptq_version,
            allow_unservable=allow_unservable,
            overwrite=overwrite,
        )

    if isinstance(source, QuantizationResult):
        if source.path is not None and source.path.is_dir():
            return from_dir(source.path)
        with tempfile.TemporaryDirectory(prefix=".quantshift-export-") as tmp:
            save(source, Path(tmp) / "q")
            source.path = None  # the temporary directory is gone afterwards
            return from_dir(Path(tmp) / "q")
    if isinstance(source, (str, Path)):
        return from_dir(source)
    raise ExportError(
        f"export needs a quantized model (a QuantizationResult or a quantized directory); "
        f"got {type(source).__name__}: quantize it first"
    )


def run_study(
    spec: Any,
    out_dir: str | Path | None = None,
    *,
    cache: str | Path | None = None,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    gpus_per_cell: float | None = None,
    cpus_per_cell: float | None = None,
    max_retries: int | None = None,
    lock_timeout: float | None = None,
    data_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
    max_memory: str | None = None,
) -> dict:
    """Run a study (a StudySpec, its dict form or a YAML path): every cell its cache lacks, then the
    report. out_dir defaults to runs/<study name>, cache to <out_dir>/../.cache; `device`
    overrides the study's, `dtype` every model's (e.g. float32 on a CPU with bf16 units). Returns the summary (works run, results computed, failures, seconds)
    with `out_dir` and `report` (the Markdown report's path)."""
    from .studies.runner import run_study as run
    from .studies.spec import StudySpec, load_study, study_from_dict

    if isinstance(spec, StudySpec):
        study = spec.model_copy(deep=True)  # the caller's spec is never changed
    elif isinstance(spec, dict):
        study = study_from_dict(spec)
    elif isinstance(spec, (str, Path)):
        study = load_study(spec)
    else:
        raise ConfigError(f"a study is a StudySpec, a dict or a YAML path; got {type(spec).__name__}")
    if device:
        study.device = device
    if dtype:
        from .validate import check_dtype

        check_dtype("dtype", dtype)
        study.models = [m.model_copy(update={"dtype": dtype}) for m in study.models]
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / study.name
    summary = run(
        study,
        run_dir,
        Path(cache) if cache is not None else run_dir.parent / ".cache",
        executor=executor,
        ray_address=ray_address,
        gpus_per_cell=gpus_per_cell,
        cpus_per_cell=cpus_per_cell,
        max_retries=max_retries,
        lock_timeout=lock_timeout,
        data_dir=str(data_dir) if data_dir else None,
        progress=progress,
        echo=echo,
        jobs=jobs,
        max_memory=max_memory,
    )
    return {**summary, "out_dir": str(run_dir), "report": str(run_dir / "report.md")}
