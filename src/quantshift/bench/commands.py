"""`quantshift bench`: efficiency metrics of a model or quantized directory as loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import validate


def _sizes(text: str) -> list[int]:
    from ..errors import ConfigError

    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes takes comma-separated integers like 1,8,32, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--batch-sizes takes positive integers, got {text!r}")
    return sizes


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        model: Annotated[str, typer.Argument(help="quantized directory, bundled alias, local dir or hub id")],
        batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8,32",
        prompt_len: Annotated[int, typer.Option(help="prompt tokens per sequence (prefill)")] = 128,
        gen_len: Annotated[int, typer.Option(help="generated tokens per sequence (1 from prefill + decode steps)")] = 32,
        repeats: Annotated[int, typer.Option(help="runs per batch size; the fastest is kept")] = 1,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
        dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
        json_out: Annotated[Path | None, typer.Option("--json", help="write metrics JSON here")] = None,
    ) -> None:
        """Measure size on disk, packed weight bytes, peak memory, prefill and decode tokens/s."""
        validate.command("bench", locals())  # every option checked before anything runs
        from ..checkpoint import versions, write_json_atomic
        from ..cli import _threads
        from ..errors import ConfigError
        from ..models.load import load_model
        from .measure import environment, run_bench

        sizes = _sizes(batch_sizes)
        if prompt_len < 1 or gen_len < 2:
            raise ConfigError("--prompt-len must be >= 1 and --gen-len >= 2")
        _threads()
        loaded = load_model(model, device=device, dtype=dtype)
        dev = next(loaded.model.parameters()).device
        metrics, notes = run_bench(loaded.model, batch_sizes=sizes, prompt_len=prompt_len, gen_len=gen_len,
                                   repeats=repeats, quant_info=loaded.quant_info, path=loaded.path)
        env = environment(dev)
        typer.echo(f"device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, torch {env['torch']}, "
                   f"{env['threads']} threads, dtype {str(next(loaded.model.parameters()).dtype).replace('torch.', '')}")
        size = metrics["bench:size"]
        disk = f"{size['disk_bytes'] / 2**20:.1f} MiB on disk, " if "disk_bytes" in size else ""
        typer.echo(f"size: {disk}{size['param_bytes'] / 2**20:.1f} MiB as loaded, "
                   f"{size['packed_weight_bytes'] / 2**20:.1f} MiB packed (fp16 for float parts)")
        typer.echo(f"peak memory: {metrics['bench:memory']['peak_rss_bytes'] / 2**20:.0f} MiB RSS"
                   + (f", {metrics['bench:memory']['peak_cuda_bytes'] / 2**20:.0f} MiB CUDA"
                      if "peak_cuda_bytes" in metrics["bench:memory"] else ""))
        typer.echo(f"{'batch':>5s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'ms/step':>8s}")
        for bs in sizes:
            p, d = metrics[f"bench:prefill@{bs}"], metrics[f"bench:decode@{bs}"]
            typer.echo(f"{bs:5d} {p['tokens_per_s']:14.1f} {d['tokens_per_s']:13.1f} {d['ms_per_step']:8.2f}")
        for note in notes:
            typer.echo(f"note: {note}")
        if json_out is not None:
            write_json_atomic(json_out, {"model": model, "path": loaded.path, "metrics": metrics, "notes": notes,
                                         "environment": env, "versions": versions(),
                                         "quantization": loaded.quant_info and {k: loaded.quant_info.get(k)
                                                                                for k in ("recipe", "base_model")}})
