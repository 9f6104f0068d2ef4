"""Command-line interface: list | device | quantize | eval (more commands register from their modules)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from . import validate
from .errors import QuantshiftError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize causal LMs and study how calibration data shapes the result.",
)
_STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    _STATE["debug"] = debug


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
        typer.echo(
            "task:<task or glob>  text of tasks' calibration parts, e.g. task:movie_sentiment, task:ceval_*"
            " (see `list tasks`; data-dir tasks need --data-dir)"
        )
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


@app.command("device")
def device_cmd(device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto") -> None:
    """What the compute device can do and what quantshift chooses on it: dtype auto and the
    int4 / int8 / fp8 kernels, each with its reason (models.capability)."""
    validate.check_device("--device", device)
    from .models import capability

    for line in capability.detect(device).lines():
        typer.echo(line)


def _extra_listings() -> dict:
    from .evaluation.tasks import SUITES, TASKS

    return {"tasks": TASKS, "suites": SUITES}


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
    calib: Annotated[
        str, typer.Option(help="calibration source (see `list calib`); a+b = n windows from each")
    ] = "wikipedia",
    nsamples: Annotated[int, typer.Option(help="calibration windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="tokens per calibration window")] = 512,
    seed: Annotated[int, typer.Option(help="calibration sampling seed")] = 42,
    device: Annotated[str, typer.Option(help="compute device: auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    data_dir: Annotated[
        str | None, typer.Option(help="directory with local task data, for --calib task:<name>")
    ] = None,
    propagate: Annotated[
        str,
        typer.Option(
            help="calibrate each block on the quantized model's activations "
            "(quantized, GPTQ's way) or the fp model's (fp: cacheable)"
        ),
    ] = "quantized",
    stats_cache: Annotated[
        Path | None,
        typer.Option(help="with --propagate fp: keep GPTQ-family Hessians here per calibration set and reuse them"),
    ] = None,
    activations: Annotated[
        str,
        typer.Option(
            help="where calibration activations live on a GPU: auto (on it when "
            "they fit in a quarter of its free memory), device, offload (CPU)"
        ),
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="memory caps, e.g. cpu=16GiB,cuda:0=70GiB (default: what is "
            "free); a model that does not fit streams from disk"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Quantize a model with a method or a recipe and save it."""
    validate.command("quantize", locals())  # every option checked before the model loads
    from . import api, threads

    threads.use_all_cores()
    shared = "nsamples seqlen seed device dtype batch_size data_dir propagate stats_cache activations out overwrite"
    given = validate.forwarded(locals(), shared + " max_memory")
    formats = validate.forwarded(locals(), "wbits abits group_size sym") if recipe is None else {}
    t0 = time.time()
    res = api.quantize(model, recipe or method or "", calib, progress=not quiet, **given, **formats)
    path = res.path
    why = _precision_reason(dtype, res.device)
    typer.echo(
        f"quantized {model} with {res.recipe.describe()} ({res.precision}{why}) in {time.time() - t0:.1f}s -> {path}"
    )


def _precision_reason(dtype: str, device: str) -> str:
    """'; <why auto chose it>' for --dtype auto (models.capability), else ''."""
    if dtype != "auto":
        return ""
    from .models.precision import resolve_precision

    return f"; {resolve_precision(dtype, device).reason}"


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="quantized directory, bundled alias, local dir or hub id")],
    ppl: Annotated[str | None, typer.Option(help="comma-separated text sources for perplexity")] = None,
    tasks: Annotated[
        str | None, typer.Option(help="comma-separated tasks: quantshift's (`list tasks`) or lm-eval names")
    ] = None,
    suite: Annotated[
        str | None, typer.Option(help="named suite, e.g. offline, instruct-offline (`list suites`)")
    ] = None,
    shots: Annotated[
        str | None, typer.Option(help="comma-separated few-shot counts (default: the suite's, else 0)")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(help="items scored per task (default 200 for quantshift tasks, all for lm-eval's; 0 = all)"),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="local datasets for boss/ceval/cmmlu")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write metrics JSON here (samples beside it)")] = None,
    seqlen: Annotated[int, typer.Option(help="perplexity window length")] = 512,
    max_windows: Annotated[int, typer.Option(help="cap on perplexity windows per source (0 = all)")] = 64,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 4,
    seed: Annotated[int, typer.Option(help="few-shot sampling seed")] = 1234,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    mt_bench: Annotated[
        Path | None, typer.Option("--mt-bench", help="MT-Bench-layout questions JSONL: answer, then grade with --judge")
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="MT-Bench judge: hf:<hub id or dir> or openai:<model>@<base url>")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="MT-Bench answer length cap")] = 256,
    backend: Annotated[
        str,
        typer.Option(
            help="quantized directory as fake-quant float weights (fake) or with "
            "low-bit kernels (packed, see quant.inference)"
        ),
    ] = "fake",
    head: Annotated[
        str,
        typer.Option(
            help="packed backend: the output projection as stored (float) or in int8 "
            "(int8, as llama.cpp's 4-bit files store it)"
        ),
    ] = "float",
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="memory caps, e.g. cpu=16GiB,cuda:0=70GiB (default: what is "
            "free); a model that does not fit streams from disk"
        ),
    ] = None,
    chat_template: Annotated[
        str, typer.Option(help="task prompts through the tokenizer's chat template: off, auto (when it has one) or on")
    ] = "off",
) -> None:
    """Evaluate a model: perplexity on held-out text, lm-eval tasks (multiple choice by log-likelihood),
    MT-Bench-style judged dialogue."""
    validate.command("eval", locals())  # every option checked before the model loads
    from . import api, threads
    from .errors import ConfigError
    from .evaluation.run import samples_file

    threads.use_all_cores()
    try:
        shot_list = [int(k) for k in shots.split(",") if k.strip()] if shots else None
    except ValueError:
        raise ConfigError(f"--shots must be comma-separated integers, got {shots!r}") from None
    shared = "suite limit data_dir seqlen max_windows batch_size seed device dtype mt_bench judge max_new_tokens"
    given = validate.forwarded(locals(), shared + " json_out backend head max_memory chat_template")
    metrics = api.evaluate(model, ppl or (), tasks or (), shots=shot_list, progress=not quiet, **given)
    for key, m in metrics.items():
        if key.startswith("ppl:"):
            bpb = f"  bpb {m['bpb']:.4f}" if m.get("bpb") is not None else ""  # tokenizer-independent
            typer.echo(
                f"{key:34s} ppl {m['ppl']:10.3f}{bpb}  ({m['tokens']} tokens, {m['bytes']} bytes, "
                f"{m['windows']} x {m['seqlen']})"
            )
        else:
            parts = [
                f"{k} {m[k]:.4f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]"
                for k in ("acc", "acc_norm", "f1", "exact_match", "score")
                if isinstance(m.get(k), float) and m.get(k + "_ci")
            ]
            typer.echo(f"{key:34s} {'  '.join(parts)}  n={m.get('n')}")
    if json_out is not None:
        typer.echo(f"wrote {json_out} and {samples_file(json_out)}")


# Commands owned by other subpackages; each module defines `register(app)`.
_COMMAND_MODULES = (
    "quantshift.exporters.commands",
    "quantshift.studies.commands",
    "quantshift.bench.commands",
    "quantshift.preview",
)


def _register_commands() -> None:
    import importlib

    for mod in _COMMAND_MODULES:  # all part of quantshift: a failing import is a broken install
        importlib.import_module(mod).register(app)


_register_commands()


def main() -> None:
    import torch

    exit_kinds, usage_kinds, abort_kinds = _click_kinds()
    try:
        code = app(standalone_mode=False)
    except QuantshiftError as err:
        _fail(err)
    except torch.OutOfMemoryError as err:
        _fail(err, "out of memory: try --device cpu, a smaller --batch-size or fewer --nsamples")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except exit_kinds as err:
        sys.exit(getattr(err, "exit_code", 0))
    except usage_kinds as err:  # unknown option or command, a value of the wrong type: one line, exit 2
        fmt = getattr(err, "format_message", None)
        message = str(fmt() if callable(fmt) else err)
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `quantshift`: the help, not an error line
            if message.strip():
                typer.echo(message.rstrip(), err=True)
            sys.exit(2)
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(err, " ".join(message.split()) + hint)
    except abort_kinds:
        sys.exit(130)
    if isinstance(code, int) and code:  # typer.Exit(n) inside a command returns n without standalone mode
        sys.exit(code)


def _click_kinds() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """(exit, usage error, abort) exception classes of click and of the copy newer typers vendor."""
    import click

    mods = [click.exceptions]
    try:
        import typer._click.exceptions as vendored  # typer >= 0.20 ships its own click

        mods.append(vendored)
    except ImportError:
        pass
    exits = {click.exceptions.Exit, typer.Exit, *(getattr(m, "Exit", click.exceptions.Exit) for m in mods)}
    aborts = {click.exceptions.Abort, typer.Abort, *(getattr(m, "Abort", click.exceptions.Abort) for m in mods)}
    return tuple(exits), tuple(m.ClickException for m in mods), tuple(aborts)


def _fail(err: BaseException, message: str | None = None) -> None:
    if _STATE["debug"]:
        raise err
    typer.echo(f"error: {message or err}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
