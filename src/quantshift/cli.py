"""Command-line interface: list | quantize | eval (more commands register from their modules)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .errors import QuantshiftError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize causal LMs and study how calibration data shapes the result.")
_STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    _STATE["debug"] = debug


def _threads() -> None:
    import torch

    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


@app.command("list")
def list_cmd(what: Annotated[str, typer.Argument(help="models | methods | calib | tasks | suites")]) -> None:
    """List what quantshift knows."""
    from .data.sources import SOURCES
    from .methods import METHODS
    from .models.bundled import BUNDLED

    if what == "models":
        for name, m in BUNDLED.items():
            typer.echo(f"{name:16s} {m.description}  [{m.note}]")
        typer.echo("(also: any Hugging Face hub id or local model directory)")
    elif what == "methods":
        for name, cls in METHODS.items():
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            typer.echo(f"{name:12s} {cls.kind:9s} {doc}")
    elif what == "calib":
        for name, s in SOURCES.items():
            typer.echo(f"{name:12s} {'online ' if s.online else 'offline'} {s.language}  {s.description}")
        typer.echo("task:<task or glob>  text of tasks' calibration parts, e.g. task:movie_sentiment, task:ceval_*"
                   " (see `list tasks`; data-dir tasks need --data-dir)")
        typer.echo("(also: a local .txt / .jsonl file, or hf:<dataset>[:<config>])")
    else:
        from .registry import Registry

        extra: dict[str, Registry] = _extra_listings()
        if what not in extra:
            raise QuantshiftError(f"cannot list {what!r}; allowed: models, methods, calib, {', '.join(extra)}")
        for name, item in extra[what].items():
            needs = getattr(item, "needs", "")
            needs = ",".join(needs) if isinstance(needs, (tuple, list)) else needs
            typer.echo(f"{name:26s} {f'[needs {needs}] ' if needs else ''}{getattr(item, 'description', '')}")
        if what == "tasks":
            typer.echo("(also: any lm-eval task name, e.g. arc_easy, hellaswag, mmlu)")


def _extra_listings() -> dict:
    out = {}
    try:
        from .evaluation.tasks import SUITES, TASKS

        out = {"tasks": TASKS, "suites": SUITES}
    except ImportError:
        pass
    return out


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="bundled alias, local directory or hub id")],
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    method: Annotated[str | None, typer.Option(help="method name (see `list methods`)")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (ordered stages)")] = None,
    wbits: Annotated[int | None, typer.Option(help="weight bits 2..8 (16 = keep)")] = None,
    abits: Annotated[int | None, typer.Option(help="activation bits 4..8 (16 = keep)")] = None,
    group_size: Annotated[int | None, typer.Option(help="group size; -1 per channel, 0 per tensor")] = None,
    sym: Annotated[bool | None, typer.Option("--sym/--asym", help="symmetric grid")] = None,
    calib: Annotated[str, typer.Option(help="calibration source (see `list calib`); a+b = n windows from each")] = "wikipedia",
    nsamples: Annotated[int, typer.Option(help="calibration windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="tokens per calibration window")] = 512,
    seed: Annotated[int, typer.Option(help="calibration sampling seed")] = 42,
    device: Annotated[str, typer.Option(help="compute device: auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    data_dir: Annotated[str | None, typer.Option(help="directory with local task data, for --calib task:<name>")] = None,
    propagate: Annotated[str, typer.Option(help="calibrate each block on the quantized model's activations "
                                                "(quantized, GPTQ's way) or the fp model's (fp: cacheable)")] = "quantized",
    stats_cache: Annotated[Path | None, typer.Option(help="with --propagate fp: keep GPTQ-family Hessians here "
                                                              "per calibration set and reuse them")] = None,
    activations: Annotated[str, typer.Option(help="where calibration activations live on a GPU: auto (on it when "
                                                  "they fit in a quarter of its free memory), device, offload (CPU)")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Quantize a model with a method or a recipe and save it."""
    from .data.calibset import build_calibset
    from .errors import ConfigError
    from .models.load import load_model, resolve_device
    from .quant.engine import ACTIVATION_MODES
    from .quantize import quantize_model, save
    from .recipes import load_recipe, recipe_from_cli

    _threads()
    if (method is None) == (recipe is None):
        raise ConfigError("give exactly one of --method or --recipe")
    if propagate not in ("quantized", "fp"):
        raise ConfigError(f"--propagate must be 'quantized' or 'fp', got {propagate!r}")
    if activations not in ACTIVATION_MODES:
        raise ConfigError(f"--activations must be {', '.join(ACTIVATION_MODES[:-1])} or {ACTIVATION_MODES[-1]}, "
                          f"got {activations!r}")
    if stats_cache is not None and propagate != "fp":
        raise ConfigError("--stats-cache needs --propagate fp: with quantized propagation each block's inputs "
                          "depend on the bit width and method, so its statistics cannot be reused")
    options = {"wbits": wbits, "abits": abits, "group_size": group_size, "sym": sym}
    if recipe is not None:
        if any(v is not None for v in options.values()):
            raise ConfigError("--wbits/--abits/--group-size/--sym go with --method; put them in the recipe file instead")
        rec = load_recipe(recipe)
    else:
        rec = recipe_from_cli(method or "", **options)
    dev = resolve_device(device)
    t0 = time.time()
    # weights stay on the CPU; the engine moves one block at a time to the compute device
    loaded = load_model(model, device="cpu", dtype=dtype, compute_device=dev)
    cal = None
    if rec.needs_calibration:
        cal = build_calibset(calib, loaded.tokenizer, nsamples, seqlen, seed, add_bos=loaded.needs_bos,
                             tokenizer_name=model, data_dir=data_dir)
    store = None
    if stats_cache is not None:
        from .quant.statstore import StatsStore
        from .studies.runner import model_identity
        from .studies.spec import ModelAxis, digest

        # keyed like a study's cache: a local model directory by a fingerprint of its files
        store = StatsStore(stats_cache, digest({"model": model_identity(ModelAxis(name=model)),
                                                "dtype": loaded.precision.name}))
    qres = quantize_model(loaded, rec, cal, device=dev, batch_size=batch_size, progress=not quiet,
                          propagate=propagate, stats_store=store, activations=activations)
    path = save(loaded, qres, out, overwrite=overwrite)
    typer.echo(f"quantized {model} with {rec.describe()} ({loaded.precision.name}) in {time.time() - t0:.1f}s -> {path}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="quantized directory, bundled alias, local dir or hub id")],
    ppl: Annotated[str | None, typer.Option(help="comma-separated text sources for perplexity")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks: quantshift's (`list tasks`) or lm-eval names")] = None,
    suite: Annotated[str | None, typer.Option(help="a named suite (`list suites`): offline, s1, boss, ceval, cmmlu, instruct, ppl")] = None,
    shots: Annotated[str | None, typer.Option(help="comma-separated few-shot counts (default: the suite's, else 0)")] = None,
    limit: Annotated[int | None, typer.Option(help="items scored per task (default 200 for quantshift tasks, all for lm-eval's; 0 = all)")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="local datasets for boss/ceval/cmmlu")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write metrics JSON here (samples beside it)")] = None,
    seqlen: Annotated[int, typer.Option(help="perplexity window length")] = 512,
    max_windows: Annotated[int, typer.Option(help="cap on perplexity windows per source (0 = all)")] = 64,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 4,
    seed: Annotated[int, typer.Option(help="few-shot sampling seed")] = 1234,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    mt_bench: Annotated[Path | None, typer.Option("--mt-bench", help="MT-Bench-layout questions JSONL: answer, then grade with --judge")] = None,
    judge: Annotated[str | None, typer.Option(help="MT-Bench judge: hf:<hub id or dir> or openai:<model>@<base url>")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="MT-Bench answer length cap")] = 256,
) -> None:
    """Evaluate a model: perplexity on held-out text, lm-eval tasks (multiple choice by log-likelihood),
    MT-Bench-style judged dialogue."""
    from .errors import ConfigError
    from .evaluation.api import evaluate, preflight
    from .models.load import load_model

    _threads()
    split = lambda v: [x.strip() for x in (v or "").split(",") if x.strip()]  # noqa: E731
    if not ppl and not tasks and not suite and mt_bench is None:
        raise ConfigError("nothing to evaluate: give --ppl SOURCES, --tasks NAMES, --suite NAME or --mt-bench FILE")
    from .evaluation import judge as mtb

    questions = None
    if mt_bench is not None or judge is not None:
        if mt_bench is None or judge is None:
            raise ConfigError("--mt-bench QUESTIONS.jsonl and --judge SPEC go together")
        mtb.check_judge_spec(judge)
        questions = mtb.load_questions(mt_bench, limit or None)
    if suite is not None:
        from .evaluation.tasks import SUITES

        suite_def = SUITES.get(suite)  # unknown names fail here, before the model loads
    try:
        shot_list = [int(k) for k in split(shots)] if shots else (list(suite_def.shots) if suite else [0])
    except ValueError:
        raise ConfigError(f"--shots must be comma-separated integers, got {shots!r}") from None
    if any(k < 0 for k in shot_list):
        raise ConfigError("--shots must be >= 0")
    preflight(tasks=split(tasks), suite=suite, data_dir=data_dir)
    loaded = load_model(model, device=device, dtype=dtype)
    from .evaluation.api import EvalResult

    res = EvalResult()
    if ppl or tasks or suite:  # MT-Bench alone is fine too
        res = evaluate(loaded, ppl=split(ppl), tasks=split(tasks), suite=suite, shots=shot_list, limit=limit,
                       data_dir=data_dir, seqlen=seqlen, max_windows=max_windows or None, batch_size=batch_size,
                       seed=seed, progress=not quiet)
    if questions is not None and judge is not None:
        metric, rows = mtb.mt_bench(loaded, questions, mtb.make_judge(judge, device), judge, max_new_tokens,
                                    progress=not quiet, seed=seed)
        metric["questions"] = str(mt_bench)
        res.metrics[mtb.METRIC_KEY], res.samples[mtb.METRIC_KEY] = metric, rows
    for key, m in res.metrics.items():
        if key.startswith("ppl:"):
            bpb = f"  bpb {m['bpb']:.4f}" if m.get("bpb") is not None else ""  # tokenizer-independent
            typer.echo(f"{key:34s} ppl {m['ppl']:10.3f}{bpb}  ({m['tokens']} tokens, {m['bytes']} bytes, "
                       f"{m['windows']} x {m['seqlen']})")
        else:
            parts = [f"{k} {m[k]:.4f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]" for k in ("acc", "acc_norm", "f1", "exact_match", "score")
                     if isinstance(m.get(k), float) and m.get(k + "_ci")]
            typer.echo(f"{key:34s} {'  '.join(parts)}  n={m.get('n')}")
    if json_out is not None:
        from importlib.metadata import version

        from .checkpoint import versions

        samples = res.write(json_out, {"model": model, "path": loaded.path, "lm_eval": version("lm-eval"),
                                       "quantization": loaded.quant_info and {k: loaded.quant_info.get(k) for k in ("recipe", "calibration", "base_model")},
                                       "versions": versions()})
        typer.echo(f"wrote {json_out} and {samples}")


# Commands owned by other subpackages; each module defines `register(app)`.
_COMMAND_MODULES = ("quantshift.export.commands", "quantshift.studies.commands", "quantshift.bench.commands")


def _register_commands() -> None:
    import importlib

    for mod in _COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name and mod.startswith(err.name):
                continue  # that part of quantshift is not built yet
            raise
        module.register(app)


_register_commands()


def main() -> None:
    import torch

    try:
        app(standalone_mode=False)
    except QuantshiftError as err:
        _fail(err)
    except torch.OutOfMemoryError as err:
        _fail(err, "out of memory: try --device cpu, a smaller --batch-size or fewer --nsamples")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors and friends
        import click

        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(130)
        raise


def _fail(err: BaseException, message: str | None = None) -> None:
    if _STATE["debug"]:
        raise err
    typer.echo(f"error: {message or err}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
