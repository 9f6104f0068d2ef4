"""`quantshift run STUDY.yaml` and `quantshift report RUN_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from .spec import StudySpec
from .. import validate


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("report")(report_cmd)


def run_cmd(
    study: Annotated[Path, typer.Argument(help="study YAML (see studies/)")],
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<study name>)")] = None,
    cache: Annotated[Path | None, typer.Option(help="content-addressed cache (default <run dir>/../.cache)")] = None,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    jobs: Annotated[
        int, typer.Option(help="local executor: works run at once, in worker processes sharing the CPU threads")
    ] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address ('auto' = running cluster; none = start a local one)")
    ] = None,
    gpus_per_cell: Annotated[
        float | None,
        typer.Option(
            help="GPUs each Ray task asks for (fractions allowed; default: 1 "
            "when the cluster has GPUs and the study's device is not cpu)"
        ),
    ] = None,
    cpus_per_cell: Annotated[
        float | None, typer.Option(help="ray: CPUs each task asks for, its torch threads (default 1)")
    ] = None,
    max_retries: Annotated[
        int | None,
        typer.Option(
            help="ray: times a task whose worker or node died runs again; the cache keeps what it finished (default 3)"
        ),
    ] = None,
    lock_timeout: Annotated[
        float | None,
        typer.Option(
            help="ray: seconds a task waits for a work another process holds "
            "before giving its resources back and queueing again (default 60)"
        ),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="directory with offline task data (e.g. BOSS)")] = None,
    device: Annotated[str | None, typer.Option(help="override the study's device: auto, cpu, cuda")] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="override every model's dtype: auto, float32, bfloat16, float16 (float32: no bf16 autocast)"),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="memory caps, e.g. cpu=16GiB,cuda:0=70GiB (default: what is "
            "free); models that do not fit stream from disk, and works "
            "run at once only while their plans fit together"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="check the cache instead of running: read and verify every entry the study "
            "uses (and the cache's other entries), move corrupt ones to <cache>/quarantine "
            "and print ok / corrupt / missing counts; computes nothing, exits 1 if any "
            "entry was corrupt (the next run recomputes it)"
        ),
    ] = False,
) -> None:
    """Run a study (grid of models x recipes x calibration sets x evaluations); resumes where it stopped."""
    validate.command("run", locals())  # every option checked before anything runs
    from .. import threads
    from ..api import run_study

    threads.use_all_cores()
    if verify:  # a read-only check (bar moving bad entries aside): safe to run beside a running study
        from .spec import load_study

        spec = load_study(study)
        if device:
            spec.device = device
        if dtype:
            spec.models = [m.model_copy(update={"dtype": dtype}) for m in spec.models]
        run_dir = out or Path("runs") / spec.name
        raise typer.Exit(
            verify_cache(
                spec, cache or run_dir.parent / ".cache", str(data_dir) if data_dir else None, bool(gpus_per_cell)
            )
        )
    names = "cache device dtype executor ray_address gpus_per_cell cpus_per_cell max_retries lock_timeout data_dir jobs"
    given = validate.forwarded(locals(), names + " max_memory")
    summary = run_study(study, out, progress=not quiet, echo=typer.echo, **given)

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


def verify_cache(spec: StudySpec, cache_root: Path, data_dir: str | None, on_gpu: bool) -> int:
    """Verify the cache entries of `spec`'s plan; print counts and each corrupt entry; 1 if any was corrupt."""
    from .cache import Cache, verify
    from .runner import all_works, plan_study

    plan = plan_study(spec, data_dir, on_gpu=True if on_gpu else None)
    found = verify(Cache(cache_root, warn=False), all_works(plan))  # each corrupt entry is listed below
    bad = found.corrupt + found.others_corrupt
    typer.echo(
        f"verify {spec.name}: cache {cache_root}: {found.ok} ok, {len(found.corrupt)} corrupt (moved aside), "
        f"{found.missing} missing (not computed yet) of the study's entries; other entries in the cache: "
        f"{found.others_ok} ok, {len(found.others_corrupt)} corrupt (moved aside)"
        + (f"; {found.stale_temp} temp files of interrupted writes removed" if found.stale_temp else "")
    )
    for line in bad:
        typer.echo(f"  corrupt: {line}")
    if bad:
        typer.echo(f"  moved to {cache_root / 'quarantine'}; `quantshift run` recomputes what the study needs")
    return 1 if bad else 0
