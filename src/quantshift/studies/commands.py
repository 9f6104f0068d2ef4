"""`quantshift run STUDY.yaml` and `quantshift report RUN_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import validate


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("report")(report_cmd)


def run_cmd(
    study: Annotated[Path, typer.Argument(help="study YAML (see studies/)")],
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<study name>)")] = None,
    cache: Annotated[Path | None, typer.Option(help="content-addressed cache (default <run dir>/../.cache)")] = None,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    jobs: Annotated[int, typer.Option(help="local executor: works run at once, in worker processes sharing the CPU threads")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address ('auto' = running cluster; none = start a local one)")] = None,
    gpus_per_cell: Annotated[float, typer.Option(help="GPUs each Ray task asks for")] = 0.0,
    data_dir: Annotated[Path | None, typer.Option(help="directory with offline task data (e.g. BOSS)")] = None,
    device: Annotated[str | None, typer.Option(help="override the study's device: auto, cpu, cuda")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Run a study (grid of models x recipes x calibration sets x evaluations); resumes where it stopped."""
    validate.command("run", locals())  # every option checked before anything runs
    from ..cli import _threads
    from .runner import run_study
    from .spec import load_study

    _threads()
    spec = load_study(study)
    if device:
        spec.device = device
    run_dir = out or Path("runs") / spec.name
    summary = run_study(spec, run_dir, cache or run_dir.parent / ".cache", executor=executor, ray_address=ray_address,
                        gpus_per_cell=gpus_per_cell, data_dir=str(data_dir) if data_dir else None, progress=not quiet,
                        echo=typer.echo, jobs=jobs)
    if summary["failed"]:
        raise typer.Exit(1)


def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a study run directory (runs/<name>)")],
    cache: Annotated[Path | None, typer.Option(help="cache directory (default: the one the run used)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="offline task data (default: the run's)")] = None,
) -> None:
    """Rewrite a study's report (Markdown, HTML, figures) from cached results; computes nothing."""
    from .runner import report_only

    path = report_only(run_dir, cache, str(data_dir) if data_dir else None)
    typer.echo(f"report: {path} and {path.with_suffix('.html')}")
