"""`quantshift export`: write a quantized directory in a format serving engines load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import validate


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        src: Annotated[Path, typer.Argument(help="quantized directory written by `quantshift quantize`")],
        fmt: Annotated[str, typer.Option("--format", help="compressed-tensors | gptq | fp8")],
        out: Annotated[Path, typer.Option("--out", help="output directory")],
        dtype: Annotated[
            str,
            typer.Option(
                help="dtype of scales and float tensors: auto (bf16 if the base model "
                "was bf16, else fp16), float16, bfloat16, float32"
            ),
        ] = "auto",
        gptq_version: Annotated[
            int, typer.Option(help="GPTQ checkpoint_format: 1 = gptq (zero-1 stored), 2 = gptq_v2")
        ] = 1,
        allow_unservable: Annotated[
            bool,
            typer.Option(
                help="compressed-tensors: also write bit widths vLLM's kernels "
                "do not run (transformers can still load them)"
            ),
        ] = False,
        overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    ) -> None:
        """Export a quantized model (compressed-tensors / GPTQ / FP8) for vLLM and transformers."""
        validate.command("export", locals())  # every option checked before anything runs
        import json

        from ..api import export
        from .common import EXPORT_INFO

        path = export(
            src,
            out,
            fmt,
            dtype=dtype,
            gptq_version=gptq_version,
            allow_unservable=allow_unservable,
            overwrite=overwrite,
        )
        info = json.loads((path / EXPORT_INFO).read_text())
        typer.echo(
            f"exported {src} as {fmt} ({info['quantized_linears']} quantized linears, {info['dtype']}) -> {path}"
        )
        # vLLM reads quantization_config from config.json (gptq is upgraded to gptq_marlin when the
        # format allows; naming --quantization gptq explicitly would pin the slower kernel)
        typer.echo(f"serve: vllm serve {path}")
