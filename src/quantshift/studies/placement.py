"""Where a study's works run, what they ask a cluster for, and the check that they ran as planned.

A plan fixes, before anything runs, the device kind every work computes on (cpu or cuda) and the
precision each model computes in (what `dtype: auto` resolves to there); both are part of every
cache key. A work shipped to another machine (a Ray worker) may see another device (no GPU was
given to it, CUDA is not visible on its node) or resolve `auto` differently (a V100 node picks
float16 where the planning node assumed an sm80+ GPU's bfloat16, a CPU node without bf16 units
picks float32 where the driver's CPU had them). Its results would then be filed under keys that
say otherwise, so `check_placement` runs first in every work and fails the cell with a message
naming both sides instead.

`memory_request` is what a Ray task asks its node to reserve: the work's own estimate when the
plan has one (`work["memory_bytes"]`, the memory plan of the larger-than-memory work), else the
model's weights (parameters, counted from its config on the meta device, times the bytes of the
precision its weights are held in), else nothing when the config cannot be read offline. The
weights are a floor, not a peak (activations, Hessians and evaluation batches come on top), so
the request keeps two large models off one node that cannot hold both, nothing more.
"""

from __future__ import annotations

import socket
from typing import Any

from ..config import user_path
from ..errors import QuantshiftError
from .records import Work


class PlacementError(QuantshiftError):
    """A work would run on another device or in another precision than its plan (and cache keys) say."""


def planned_device_kind(versions: dict) -> str:
    """ "cuda" or "cpu": what a plan's cache keys say its works compute on (runner.plan_study)."""
    return "cuda" if versions.get("device") == "cuda" else "cpu"


def check_placement(work: Work, options: dict) -> None:
    """Raise PlacementError when this process would compute `work` on another device kind or in
    another precision than planned (options["planned_device"], work["precision"])."""
    planned = options.get("planned_device")
    if planned is None:  # a caller that plans nothing (older callers, tests of execute_work)
        return
    from ..errors import ModelError
    from ..models import capability
    from ..models.load import resolve_device
    from ..models.precision import resolve_precision
    from .spec import ModelAxis

    where = f"worker {socket.gethostname()}"
    try:
        device = resolve_device(options["device"])
    except ModelError as err:
        raise PlacementError(f"planned on {planned}, but on {where}: {err}") from None
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind != planned:
        hint = (
            "this worker was given no GPU, or CUDA is not visible on its node: ask for GPUs per cell "
            "(--gpus-per-cell) or plan for the CPU (device: cpu)"
            if planned == "cuda"
            else "a GPU is visible to this worker: set device: cpu in the study, or plan for GPUs (--gpus-per-cell)"
        )
        raise PlacementError(f"planned on {planned}, but {where} computes on {device} ({hint})")
    if work["kind"] != "model":
        return
    model = ModelAxis(**work["model"])
    got = resolve_precision(model.dtype, device)
    if got.name != work["precision"]:
        cap = capability.detect(device)
        raise PlacementError(
            f"planned in {work['precision']}, but on {where} ({cap.label}) dtype {model.dtype} resolves to {got.name}"
            + (f" ({got.reason})" if got.reason else "")
            + "; its results would be filed under the wrong precision. Give the model an explicit dtype in the "
            "study, or run the study on machines of one kind"
        )


def _bytes_per_param(precision: str | None) -> int:
    """Bytes per weight of a Precision.name ("float32+bfloat16-autocast" holds float32 weights)."""
    base = (precision or "float32").split("+", 1)[0]
    return 2 if base in ("bfloat16", "float16") else 4


def param_count(name: str) -> int | None:
    """Parameters of model `name` from its config alone (meta device, nothing allocated), or None
    when the config cannot be read without downloading or converting anything."""
    from pathlib import Path

    try:
        import transformers
        from accelerate import init_empty_weights

        from ..models.bundled import BUNDLED, cache_dir

        if name in BUNDLED:
            path: Path | str = cache_dir() / "models" / name  # a bundled model converted before
            if not (Path(path) / "config.json").is_file():
                return None
        else:
            path = user_path(name)
            path = path if path.is_dir() else name
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # a tied output projection is the embedding: counted once below
        return sum(p.numel() for p in model.parameters())
    except Exception:  # offline without the config, an architecture transformers lacks: no estimate
        return None


def memory_request(work: Work, counts: dict[str, int | None] | None = None) -> int | None:
    """Bytes a work asks its node to reserve (see the module doc); `counts` caches param_count by
    model name across the works of a study."""
    planned = work.get("memory_bytes")
    if isinstance(planned, (int, float)) and planned > 0:
        return int(planned)
    name = work["model"]["name"]
    counts = {} if counts is None else counts
    if name not in counts:
        counts[name] = param_count(name)
    n = counts[name]
    if n is None:
        return None
    precision: Any = work.get("precision")  # diag works hold the model as a model work of it would
    return n * _bytes_per_param(precision if isinstance(precision, str) else None)


def probe(device: str) -> dict:
    """What a worker sees: the device `device` resolves to, its capability and what dtype auto
    means there (run as a Ray task with a cell's resources before planning)."""
    from ..models import capability
    from ..models.load import resolve_device
    from ..models.precision import resolve_precision

    try:
        dev = resolve_device(device)
    except QuantshiftError as err:
        return {"host": socket.gethostname(), "error": str(err)}
    return {
        "host": socket.gethostname(),
        "device": dev,
        "capability": capability.detect(dev).label,
        "precision_auto": resolve_precision("auto", dev).name,
    }
