"""`quantshift bench`: efficiency metrics of a model or quantized directory, per variant.

Variants: fp32 and bf16 load the model with float weights (a quantized directory as its
fake-quant model); packed-fp32 and packed-bf16 load a quantized directory with its low-bit
kernels (quant.inference) and the remaining float parts in that dtype; packed-bf16-int8head
also runs the output projection in int8 (as llama.cpp's 4-bit files do). With several variants
each runs in its own process, so each one's peak RSS is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import validate
from .measure import VARIANTS, measure_variant


def _sizes(text: str, option: str = "--batch-sizes") -> list[int]:
    from ..errors import ConfigError

    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers like 1,8,32, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"{option} takes positive integers, got {text!r}")
    return sizes


def _variants(text: str | None, quantized: bool) -> list[str]:
    from ..errors import ConfigError

    if text is None:
        return list(VARIANTS) if quantized else ["fp32", "bf16"]
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ConfigError(f"unknown --variants {bad or text!r}; allowed: {', '.join(VARIANTS)}")
    if not quantized and any(VARIANTS[v][0] == "packed" for v in names):
        raise ConfigError("packed variants need a quantized directory")
    return names


def _in_child(model: str, variant: str, device: str, opts: dict[str, Any]) -> dict[str, Any]:
    from ..errors import QuantshiftError

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variant.json"
        cmd = [sys.executable, "-m", "quantshift.bench.commands", model, variant, device, json.dumps(opts), str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise QuantshiftError(f"bench variant {variant} failed: {tail}")
        return json.loads(out.read_text())


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_report(results: list[dict[str, Any]]) -> None:
    first = results[0]
    env = first["environment"]
    typer.echo(f"device {env['device']}, torch {env['torch']}, {env['threads']} threads")
    for res in results:
        m = res["metrics"]
        size, load = m["bench:size"], m["bench:load"]
        typer.echo(f"\n== {res['variant']} ({res['backend']}, {res['dtype']}) ==")
        disk = f"{_mib(size['disk_bytes'])} on disk, " if "disk_bytes" in size else ""
        typer.echo(
            f"size: {disk}{_mib(size['memory_bytes'])} in memory, {_mib(size['packed_weight_bytes'])} packed; "
            f"peak RSS {_mib(m['bench:memory']['peak_rss_bytes'])}"
        )
        typer.echo(
            f"copy bandwidth {m['bench:bandwidth']['copy_bytes_per_s'] / 1e9:.1f} GB/s; decode reads "
            f"{_mib(size['decode_bytes_per_step'])}/step; load {load['start']:.2f} -> {load['end']:.2f} "
            f"on {load['cores']} cores"
        )
        typer.echo(f"{'':8s} {'batch':>5s} {'tok/s':>9s} {'min-max':>19s} {'bound tok/s':>11s} {'ms/step':>8s}")
        rows = [
            (k.split(":")[1].split("@")[0], d)
            for k, d in m.items()
            if k.startswith(("bench:prefill@", "bench:decode@"))
        ]
        for kind, d in sorted(rows, key=lambda r: (r[0] != "prefill", r[1]["batch"])):
            span = f"{d['tokens_per_s_min']:.1f}-{d['tokens_per_s_max']:.1f}"
            bound = f"{d['bound_tokens_per_s']:11.1f}" if "bound_tokens_per_s" in d else f"{'':11s}"
            ms = f"{d['ms_per_step']:8.2f}" if "ms_per_step" in d else ""
            typer.echo(
                f"{kind:8s} {d['batch']:5d} {d['tokens_per_s']:9.1f} {span:>19s} {bound} {ms}"
                + (f"  (compile {d['compile_s']:.1f}s)" if "compile_s" in d else "")
            )
        for note in res["notes"]:
            typer.echo(f"note: {note}")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        model: Annotated[str, typer.Argument(help="quantized directory, bundled alias, local dir or hub id")],
        variants: Annotated[
            str | None,
            typer.Option(
                help=f"comma-separated: {', '.join(VARIANTS)} (default: all "
                "for a quantized directory, fp32,bf16 otherwise)"
            ),
        ] = None,
        backend: Annotated[
            str | None, typer.Option(help="fake or packed: shorthand for --variants fp32 or packed-bf16")
        ] = None,
        batch_sizes: Annotated[
            str | None, typer.Option(help="comma-separated batch sizes for prefill and decode")
        ] = None,
        prefill_batches: Annotated[str, typer.Option(help="prefill batch sizes")] = "1,8",
        decode_batches: Annotated[str, typer.Option(help="decode batch sizes")] = "1,8,32",
        prompt_len: Annotated[int, typer.Option(help="prompt tokens per sequence (prefill)")] = 512,
        decode_prompt_len: Annotated[int, typer.Option(help="prompt tokens before decoding")] = 128,
        gen_len: Annotated[
            int, typer.Option(help="generated tokens per sequence (1 from prefill + decode steps)")
        ] = 64,
        repeats: Annotated[int, typer.Option(help="runs per measurement: median and min-max/quartiles reported")] = 5,
        cache: Annotated[str, typer.Option(help="decode KV cache: static or dynamic")] = "static",
        compile: Annotated[
            bool, typer.Option("--compile", help="torch.compile the decode step (time reported apart)")
        ] = False,
        copy_mib: Annotated[int, typer.Option(help="MiB copied to measure memory bandwidth")] = 256,
        in_process: Annotated[
            bool, typer.Option("--in-process", help="all variants in this process (peak RSS then covers them all)")
        ] = False,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
        json_out: Annotated[Path | None, typer.Option("--json", help="write metrics JSON here")] = None,
    ) -> None:
        """Size on disk and in memory, peak RSS, prefill and decode tokens/s (median and spread) and the
        decode bandwidth bound, for float and packed variants of a model."""
        validate.command("bench", locals())  # every option checked before anything runs
        from .. import threads
        from ..checkpoint import is_quantized_dir, versions, write_json_atomic
        from ..errors import ConfigError
        from ..models.load import model_path, resolve_device

        if backend is not None and variants is not None:
            raise ConfigError("give --variants or --backend, not both")
        if backend not in (None, "fake", "packed"):
            raise ConfigError(f"--backend must be fake or packed, got {backend!r}")
        if prompt_len < 1 or gen_len < 2 or repeats < 1:
            raise ConfigError("--prompt-len and --repeats must be >= 1 and --gen-len >= 2")
        if cache not in ("static", "dynamic"):
            raise ConfigError(f"--cache must be static or dynamic, got {cache!r}")
        path = model_path(model)
        quantized = isinstance(path, Path) and is_quantized_dir(path)
        names = _variants({"fake": "fp32", "packed": "packed-bf16"}.get(backend or "", variants), quantized)
        pre = _sizes(batch_sizes, "--batch-sizes") if batch_sizes else _sizes(prefill_batches, "--prefill-batches")
        dec = _sizes(batch_sizes, "--batch-sizes") if batch_sizes else _sizes(decode_batches, "--decode-batches")
        opts = {
            "prefill_batches": pre,
            "decode_batches": dec,
            "prompt_len": prompt_len,
            "decode_prompt_len": decode_prompt_len,
            "gen_len": gen_len,
            "repeats": repeats,
            "cache": cache,
            "compile": compile,
            "copy_mib": copy_mib,
        }
        threads.use_all_cores()
        dev = resolve_device(device)
        if in_process or len(names) == 1:
            results = [measure_variant(model, v, dev, opts) for v in names]
        else:
            results = [_in_child(model, v, dev, opts) for v in names]
        print_report(results)
        if json_out is not None:
            write_json_atomic(
                json_out,
                {
                    "model": model,
                    "path": str(path),
                    "options": opts,
                    "variants": results,
                    "metrics": {f"{r['variant']}/{k}": v for r in results for k, v in r["metrics"].items()},
                    "versions": versions(),
                },
            )


def _child_main(argv: list[str]) -> None:
    """python -m quantshift.bench.commands MODEL VARIANT DEVICE OPTS_JSON OUT: one variant."""
    from .. import threads
    from ..checkpoint import write_json_atomic

    model, variant, device, opts, out = argv
    threads.use_all_cores()
    write_json_atomic(Path(out), measure_variant(model, variant, device, json.loads(opts)))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
