"""Executors run works and call `on_done(result)` as each finishes, in completion order.

local: one after another in this process (default); with jobs > 1, that many worker processes
       on this machine, each with its share of the CPU threads. On a small CPU box this overlaps
       one work's Python-bound parts (GPTQ's column loop, the harness's bookkeeping) with another's
       matrix products. Memory is scheduled too: a work starts only while the memory plans of the
       works running (runner.plan_work_memory) fit the host budget together.
ray:   each work is a Ray task on an existing cluster (`address="auto"`) or a local instance
       (`address=None`); workers read and write the same cache directory, so it must be on a
       filesystem every node sees. What a task asks for (`RaySettings`, `connect_ray`): one GPU
       when the cluster has GPUs and the study may use them (or `gpus_per_cell`, fractions
       allowed), `cpus_per_cell` CPUs (its torch threads), and the memory its model needs
       (studies.placement.memory_request), so two large models do not land on one node that
       cannot hold both. Before planning, one task with a cell's resources reports what a worker
       sees (device, capability, what dtype auto means there); the plan's cache keys use that,
       and every work checks on its worker that it computes as planned (placement.check_placement).
       A task whose node dies is retried (`max_retries`); the cache keeps every unit a dead task
       finished, so a retry computes only the rest. A task waits at most `lock_timeout` seconds for
       a work another process holds, then gives its resources back and is queued again.

Every executor runs a work holding its lock in the cache (`run_claimed`): several processes (two
`quantshift run`s, Ray nodes) may share one cache, and a work one of them is computing is never
computed again by another, which waits for the lock and then finds the work's entries done. The
in-process local executor first runs the works nobody holds and comes back to the held ones last.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import Cache
from .records import Work, WorkResult
from .work import execute_work

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import RLock

    import tqdm.std

OnDone = Callable[[WorkResult], None]


def run_claimed(
    work: Work, cache_root: str, options: dict, progress: bool = True, wait: bool | float = True
) -> WorkResult | None:
    """execute_work holding the work's lock; None (nothing run) if another process holds it and
    `wait` is False, or seconds that passed without it coming free."""
    with Cache(Path(cache_root)).claim("work", work["key"], wait) as mine:
        return execute_work(work, cache_root, options, progress) if mine else None


def run_waiting(work: Work, cache_root: str, options: dict, progress: bool = True) -> WorkResult:
    """run_claimed, waiting for the lock as long as another process holds it."""
    return run_claimed(work, cache_root, options, progress) or _failed(work, "could not take its lock")


def run_local(
    works: list[Work],
    cache_root: str,
    options: dict,
    on_done: OnDone,
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
) -> None:
    if jobs <= 1:
        held: list[Work] = []
        for w in works:
            res = run_claimed(w, cache_root, options, progress, wait=False)
            if res is None:  # another process is computing it: do the others first
                held.append(w)
            else:
                on_done(res)
        for w in held:
            on_done(run_waiting(w, cache_root, options, progress))
        return
    import os
    import shutil
    import tempfile

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    flight = tempfile.mkdtemp(prefix="quantshift-inflight-")
    try:
        todo = list(works)
        while todo:
            todo = _run_pool(todo, cache_root, options, on_done, jobs, threads, flight, progress=progress)
    finally:
        shutil.rmtree(flight, ignore_errors=True)


def _run_pool(
    works: list[Work],
    cache_root: str,
    options: dict,
    on_done: OnDone,
    jobs: int,
    threads: int,
    flight: str,
    run: Callable | None = None,
    progress: bool = False,
) -> list[Work]:
    """Run works in one process pool. A worker that dies (killed, out of memory) breaks the whole
    pool, which stops the other workers too: the works in flight at that moment are recorded as
    failed (their finished units stay cached), and the ones not yet started are returned to run in
    a new pool."""
    import concurrent.futures as cf
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: a forked copy of a process whose OpenMP pool already ran can hang
    ctx = mp.get_context("spawn")
    slots, lock = None, None
    if progress:  # each worker draws its bars on a line of its own, below the study bar
        from tqdm import tqdm

        slots, lock = ctx.Queue(), ctx.RLock()
        for i in range(jobs):
            slots.put(i + 1)
        tqdm.set_lock(lock)  # one lock for every process writing to the terminal
    pool = cf.ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads, slots, lock)
    )
    finished: set[str] = set()
    budget = host_budget(options)
    queue = list(works)
    futures: dict = {}
    broken = False

    def start_fitting() -> None:
        """Start works in order while a worker is free and their memory plans fit together (the
        first always starts: a work alone over the budget streams within its own plan)."""
        nonlocal broken
        while queue and len(futures) < jobs and not broken:
            need = queue[0].get("memory_bytes", 0)
            if futures and sum(w.get("memory_bytes", 0) for w in futures.values()) + need > budget:
                return
            w = queue.pop(0)
            try:
                futures[pool.submit(run or _worker_run, w, cache_root, options, flight, progress)] = w
            except BrokenProcessPool:
                queue.insert(0, w)
                broken = True

    try:
        start_fitting()
        while futures:
            done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                w = futures.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                except Exception as err:  # e.g. a result that cannot be sent back
                    result = _failed(w, f"{type(err).__name__}: {str(err)[:300]}")
                finished.add(result["key"])
                on_done(result)
            start_fitting()
    except BaseException:  # Ctrl-C, SIGTERM: stop the workers now, not after their current work
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    left = [w for w in works if w["key"] not in finished]
    in_flight = [w for w in left if (Path(flight) / w["key"]).exists()]
    if left and not in_flight:  # the pool broke before any work began: do not loop forever
        in_flight = left
    for w in in_flight:
        (Path(flight) / w["key"]).unlink(missing_ok=True)
        on_done(_failed(w, "its worker process died (killed or out of memory) while running it"))
    return [w for w in left if w not in in_flight]


def host_budget(options: dict) -> int:
    """Host bytes the works running at once may plan to use: the study's --max-memory, else what
    is available now."""
    from ..memory import available_host_bytes, parse_max_memory

    caps = parse_max_memory(options.get("max_memory"))
    return caps.host if caps.host is not None else available_host_bytes()


def _failed(work: Work, error: str) -> WorkResult:
    """The result of a work that never reported back (its process or node died)."""
    return {"key": work["key"], "label": work["label"], "ok": False, "computed": [], "seconds": 0.0, "error": error}


_BAR_LABEL = [""]  # the work a worker process is running, shown in front of its bars


def _worker_init(threads: int, slots: Queue[int] | None = None, lock: RLock | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    if slots is not None:
        _pin_bars(slots.get(), lock)


def _pin_bars(line: int, lock: RLock | None) -> None:
    """Every tqdm bar this process creates (ours, lm-eval's, transformers') is drawn on terminal
    line `line`, named after the current work, and cleared when done, so the bars of parallel
    works neither overwrite each other nor pile up."""
    import tqdm.std

    tqdm.std.tqdm.set_lock(lock)
    original = tqdm.std.tqdm.__dict__["__init__"]

    def init(self: tqdm.std.tqdm, *args: Any, **kwargs: Any) -> None:
        kwargs["position"], kwargs["leave"] = line, False
        if len(args) > 1:  # tqdm(iterable, desc, ...)
            args = (args[0], f"{_BAR_LABEL[0]} {args[1] or ''}".strip(), *args[2:])
        else:
            kwargs["desc"] = f"{_BAR_LABEL[0]} {kwargs.get('desc') or ''}".strip()
        return original.__get__(self, type(self))(*args, **kwargs)  # may be a partialmethod

    tqdm.std.tqdm.__init__ = init


def _worker_run(work: Work, cache_root: str, options: dict, flight: str, progress: bool = False) -> WorkResult:
    marker = Path(flight) / work["key"]
    marker.touch()  # lets the parent tell which works a dead worker was running
    _BAR_LABEL[0] = work["label"].split("/", 1)[-1]  # without the model name: short enough for one line
    result = run_waiting(work, cache_root, options, progress)
    marker.unlink(missing_ok=True)
    return result


@dataclass(frozen=True)
class RaySettings:
    """What each Ray task asks for and how failures are handled (see the module doc)."""

    address: str | None = None  # "auto" or host:port of a running cluster; None: start a local one
    gpus_per_cell: float | None = None  # None: 1 when the cluster has GPUs and the study's device allows
    cpus_per_cell: float = 1.0
    max_retries: int = 3  # a task whose worker or node dies runs again up to this many times
    lock_timeout: float = 60.0  # seconds a task waits for a work another process holds
    lock_tries: int = 20  # then the work fails, naming the lock
    probe_timeout: float = 300.0  # seconds to wait for a worker that can take a cell's resources
    local_cpus: int | None = None  # CPUs of a local instance (address None)


def cells_gpus(asked: float | None, study_device: str, cluster_gpus: float, node_gpus: float) -> float:
    """GPUs per cell: as asked, or by default 1 when the cluster has GPUs and the study's device
    is not the CPU. Refuses what cannot be scheduled or would be wasted (one-line ConfigError)."""
    from ..errors import ConfigError

    if asked is None:
        if study_device == "cpu" or cluster_gpus == 0:
            if study_device.startswith("cuda") and cluster_gpus == 0:
                raise ConfigError(f"the study's device is {study_device} but the Ray cluster has no GPUs")
            return 0.0
        return 1.0
    if asked > 0 and study_device == "cpu":
        raise ConfigError(f"--gpus-per-cell {asked:g} with device cpu: the cells would hold GPUs they do not use")
    if asked > 1 and asked != int(asked):
        raise ConfigError(f"--gpus-per-cell {asked:g}: Ray takes fractions below 1 or whole numbers of GPUs")
    if asked > node_gpus:
        raise ConfigError(
            f"--gpus-per-cell {asked:g}: no node of the Ray cluster has that many GPUs (most: {node_gpus:g})"
        )
    if asked == 0 and study_device.startswith("cuda"):
        raise ConfigError(f"--gpus-per-cell 0 with device {study_device}: the cells would get no GPU")
    return float(asked)


@dataclass
class RayCluster:
    """A connection to a Ray cluster and what its cells will get there."""

    ray: Any
    settings: RaySettings
    started_here: bool
    gpus: float  # per cell
    nodes: list[dict]  # resources of each alive node
    probe: dict  # placement.probe() on a worker with a cell's resources

    @property
    def precision_auto(self) -> str | None:
        return self.probe.get("precision_auto")

    def largest(self, resource: str) -> float:
        return max((n.get(resource, 0.0) for n in self.nodes), default=0.0)

    def describe(self) -> str:
        s = self.settings
        total = {k: sum(n.get(k, 0.0) for n in self.nodes) for k in ("CPU", "GPU")}
        return (
            f"ray: {len(self.nodes)} nodes ({total['CPU']:g} CPUs, {total['GPU']:g} GPUs); each cell asks for "
            f"{s.cpus_per_cell:g} CPUs, {self.gpus:g} GPUs and its model's memory; up to {s.max_retries} retries; "
            f"a worker sees {self.probe.get('device')} ({self.probe.get('capability')}), dtype auto = "
            f"{self.precision_auto}"
        )

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


def connect_ray(settings: RaySettings, study_device: str) -> RayCluster:
    """Connect (or start a local instance), resolve GPUs per cell and probe a worker."""
    from ..deps import import_optional
    from ..errors import ConfigError
    from .placement import probe

    ray = import_optional("ray", "pip install 'quantshift[ray]'", "the ray executor")
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = (
            {"address": settings.address}
            if settings.address
            else {"num_cpus": settings.local_cpus, "include_dashboard": False}
        )
        ray.init(log_to_driver=False, **kwargs)
    try:
        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        gpus = cells_gpus(
            settings.gpus_per_cell,
            study_device,
            sum(n.get("GPU", 0.0) for n in nodes),
            max((n.get("GPU", 0.0) for n in nodes), default=0.0),
        )
        if settings.cpus_per_cell > max((n.get("CPU", 0.0) for n in nodes), default=0.0):
            raise ConfigError(
                f"--cpus-per-cell {settings.cpus_per_cell:g}: no node of the Ray cluster has that many CPUs"
            )
        task = ray.remote(probe).options(
            num_cpus=settings.cpus_per_cell, num_gpus=gpus, max_retries=settings.max_retries
        )
        ref = task.remote(study_device)
        try:
            seen = ray.get(ref, timeout=settings.probe_timeout)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise ConfigError(
                f"no Ray worker could take a cell's resources ({settings.cpus_per_cell:g} CPUs, {gpus:g} "
                f"GPUs) within {settings.probe_timeout:g}s"
            ) from None
        except ray.exceptions.RayError as err:
            raise ConfigError(
                f"probing a Ray worker failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            ) from None
        if "error" in seen:
            raise ConfigError(f"a Ray worker ({seen['host']}) cannot compute this study: {seen['error']}")
        return RayCluster(ray, settings, started_here, gpus, nodes, seen)
    except BaseException:
        if started_here:
            ray.shutdown()
        raise


def _ray_work(work: Work, cache_root: str, options: dict, threads: int, lock_timeout: float) -> WorkResult:
    """One Ray task: the work under its lock, waiting at most `lock_timeout` seconds for it."""
    import torch

    torch.set_num_threads(threads)
    result = run_claimed(work, cache_root, options, False, wait=lock_timeout)
    if result is None:
        return {**_failed(work, f"another process held its lock for {lock_timeout:g}s"), "deferred": True}
    return result


def run_ray(works: list[Work], cache_root: str, options: dict, on_done: OnDone, cluster: RayCluster) -> None:
    """Each work as a Ray task with the cluster's per-cell requests; results in completion order."""
    from .placement import memory_request

    ray, s = cluster.ray, cluster.settings
    task = ray.remote(_ray_work)
    threads = max(1, math.floor(s.cpus_per_cell))
    counts: dict[str, int | None] = {}
    largest = cluster.largest("memory")

    def submit(w: Work, memory: int | None) -> Any:
        opts: dict[str, Any] = {"num_cpus": s.cpus_per_cell, "num_gpus": cluster.gpus, "max_retries": s.max_retries}
        if memory:
            opts["memory"] = memory
        return task.options(**opts).remote(w, cache_root, options, threads, s.lock_timeout)

    pending: dict[Any, tuple[Work, int | None]] = {}
    for w in works:
        memory = memory_request(w, counts)
        if memory and largest and memory > largest:
            on_done(
                _failed(
                    w,
                    f"needs {memory / 2**30:.1f} GiB of memory (its model's weights), more than any node of "
                    f"the Ray cluster offers (largest: {largest / 2**30:.1f} GiB)",
                )
            )
            continue
        pending[submit(w, memory)] = (w, memory)
    tries: dict[str, int] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        w, memory = pending.pop(ref)
        try:
            result = ray.get(ref)
        except Exception as err:  # every retry failed (worker killed, node lost, out of memory)
            result = _failed(
                w,
                f"ray task failed after {s.max_retries} retries: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:300]}",
            )
        if result.get("deferred"):
            tries[w["key"]] = tries.get(w["key"], 0) + 1
            if tries[w["key"]] < s.lock_tries:  # after the others already queued
                pending[submit(w, memory)] = (w, memory)
                continue
            result = _failed(
                w,
                f"another process has held its lock in {cache_root}/locks for over "
                f"{s.lock_timeout * s.lock_tries:g}s (another run on this cache?)",
            )
            result.pop("deferred", None)
        on_done(result)
