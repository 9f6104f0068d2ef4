"""Executors run works and call `on_done(result)` as each finishes, in completion order.

local: one after another in this process (default); with jobs > 1, that many worker processes
       on this machine, each with its share of the CPU threads. On a small CPU box this overlaps
       one work's Python-bound parts (GPTQ's column loop, the harness's bookkeeping) with another's
       matrix products. Memory is scheduled too: a work starts only while the memory plans of the
       works running (runner.plan_work_memory) fit the host budget together.
ray:   each work is a Ray task on an existing cluster (`address="auto"`) or a local instance
       (`address=None`), asking for `gpus` GPUs per task; workers read and write the same cache
       directory, so it must be on a filesystem every node sees.

Every executor runs a work holding its lock in the cache (`run_claimed`): several processes (two
`quantshift run`s, Ray nodes) may share one cache, and a work one of them is computing is never
computed again by another, which waits for the lock and then finds the work's entries done. The
in-process local executor first runs the works nobody holds and comes back to the held ones last.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .cache import Cache
from .records import Work, WorkResult
from .work import execute_work

OnDone = Callable[[WorkResult], None]


def run_claimed(work: Work, cache_root: str, options: dict, progress: bool = True,
                wait: bool = True) -> WorkResult | None:
    """execute_work holding the work's lock; None (nothing run) if another process holds it and
    `wait` is False."""
    with Cache(Path(cache_root)).claim("work", work["key"], wait) as mine:
        return execute_work(work, cache_root, options, progress) if mine else None


def run_waiting(work: Work, cache_root: str, options: dict, progress: bool = True) -> WorkResult:
    """run_claimed, waiting for the lock as long as another process holds it."""
    return run_claimed(work, cache_root, options, progress) or _failed(work, "could not take its lock")


def run_local(works: list[Work], cache_root: str, options: dict, on_done: OnDone, progress: bool = True,
              jobs: int = 1, threads: int | None = None) -> None:
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


def _run_pool(works: list[Work], cache_root: str, options: dict, on_done: OnDone, jobs: int, threads: int,
              flight: str, run: Callable | None = None, progress: bool = False) -> list[Work]:
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
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                  initargs=(threads, slots, lock))
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


def _worker_init(threads: int, slots=None, lock=None) -> None:
    import torch

    torch.set_num_threads(threads)
    if slots is not None:
        _pin_bars(slots.get(), lock)


def _pin_bars(line: int, lock) -> None:
    """Every tqdm bar this process creates (ours, lm-eval's, transformers') is drawn on terminal
    line `line`, named after the current work, and cleared when done, so the bars of parallel
    works neither overwrite each other nor pile up."""
    import tqdm.std

    tqdm.std.tqdm.set_lock(lock)
    original = tqdm.std.tqdm.__dict__["__init__"]

    def init(self, *args, **kwargs):
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


def run_ray(works: list[Work], cache_root: str, options: dict, on_done: OnDone, *, address: str | None = None,
            gpus: float = 0.0, cpus: float = 1.0, local_cpus: int | None = None) -> None:
    from ..deps import import_optional

    ray = import_optional("ray", "pip install 'quantshift[ray]'", "the ray executor")
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": local_cpus, "include_dashboard": False}
        ray.init(log_to_driver=False, **kwargs)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_waiting)
        pending = {task.remote(w, cache_root, options, False): w for w in works}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            w = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # the worker died (OOM, node lost): record and go on
                result = _failed(w, f"ray task failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            on_done(result)
    finally:
        if started_here:
            ray.shutdown()
