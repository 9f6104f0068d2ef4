"""Executors run works and call `on_done(result)` as each finishes, in completion order.

local: one after another in this process (default).
ray:   each work is a Ray task on an existing cluster (`address="auto"`) or a local instance
       (`address=None`), asking for `gpus` GPUs per task; workers read and write the same cache
       directory, so it must be on a filesystem every node sees.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import QuantshiftError
from .runner import execute_work

OnDone = Callable[[dict], None]


def run_local(works: list[dict], cache_root: str, options: dict, on_done: OnDone, progress: bool = True) -> None:
    for w in works:
        on_done(execute_work(w, cache_root, options, progress))


def run_ray(works: list[dict], cache_root: str, options: dict, on_done: OnDone, *, address: str | None = None,
            gpus: float = 0.0, cpus: float = 1.0, local_cpus: int | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise QuantshiftError("the ray executor needs ray: pip install 'quantshift[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": local_cpus, "include_dashboard": False}
        ray.init(log_to_driver=False, **kwargs)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(execute_work)
        pending = {task.remote(w, cache_root, options, False): w for w in works}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            w = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # the worker died (OOM, node lost): record and go on
                result = {"key": w["key"], "label": w["label"], "ok": False, "computed": [],
                          "error": f"ray task failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            on_done(result)
    finally:
        if started_here:
            ray.shutdown()
