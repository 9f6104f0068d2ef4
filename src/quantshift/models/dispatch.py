"""A model larger than memory, run whole (lm-eval tasks, generation) through accelerate's
offload hooks: accelerate's `infer_auto_device_map` decides, within the memory budget, which
modules stay resident (on the compute device, or on the CPU beside a GPU) and which are read
from disk at each forward ("disk"), and its `AlignDevicesHook`s move the weights in and out
around every forward. The weights of offloaded modules come from the model's weight source
(models.lazy), which reads them from the safetensors shards where they already are: nothing is
copied to an offload folder, and a quantized directory's fake-quant weights are dequantized from
their codes when read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from .lazy import WeightSource, materialize
from .shards import bound_allocator


class SourceMap(Mapping):
    """A weight source as the lazy `weights_map` accelerate's hooks read (name -> tensor); names
    listed in `resident` (CPU copies of modules offloaded beside a GPU) are served from memory."""

    def __init__(self, source: WeightSource, names: list[str], resident: dict[str, torch.Tensor] | None = None) -> None:
        self.source, self.names, self.resident = source, names, resident or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.resident:
            return self.resident[name]
        return self.source.read([name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Dispatch:
    """Where each top-level module of a dispatched model lives ("cpu", "cuda:0", "disk")."""

    device_map: dict[str, str]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.device_map.values():
            out[d] = out.get(d, 0) + 1
        return out

    def line(self) -> str:
        return "dispatched (accelerate): " + ", ".join(f"{n} modules on {d}" for d, n in sorted(self.counts().items()))


def dispatch(
    model: nn.Module,
    source: WeightSource,
    device: torch.device,
    budget: int,
    host_budget: int | None = None,
    no_split: list[str] | None = None,
) -> Dispatch:
    """Attach accelerate's offload hooks to a skeleton whose weights are in `source`: modules
    worth `budget` bytes stay resident on `device` (beside a GPU, `host_budget` more stay in CPU
    memory), the rest are read from disk at each forward."""
    from accelerate import infer_auto_device_map
    from accelerate.hooks import attach_align_device_hook_on_blocks

    bound_allocator()  # weights read per forward are freed per forward: give their memory back
    on_gpu = device.type == "cuda"
    main: int | str = (device.index or 0) if on_gpu else "cpu"
    max_memory: dict[int | str, int] = {main: max(0, budget)}
    if on_gpu:
        max_memory["cpu"] = max(0, host_budget or 0)
    dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split or [])
    device_map = {
        name: (
            "disk"
            if d == "disk"
            else ("cpu" if d == "cpu" else str(torch.device("cuda", d) if isinstance(d, int) else d))
        )
        for name, d in dmap.items()
    }
    modules = dict(model.named_modules())
    resident: dict[str, torch.Tensor] = {}
    for name, where in device_map.items():
        if where == "disk":
            continue
        prefix = f"{name}." if name else ""
        if on_gpu and where == "cpu":  # offloaded to CPU memory: kept as a state dict for the hooks
            materialize(modules[name], prefix, source, "cpu")
            resident.update({f"{prefix}{k}": v for k, v in modules[name].state_dict().items()})
            from .lazy import release

            release(modules[name])
        else:
            materialize(modules[name], prefix, source, where)
    execution = {name: str(device) if where in ("cpu", "disk") else where for name, where in device_map.items()}
    execution[""] = str(device)
    offloaded = ("disk",) if not on_gpu else ("cpu", "disk")
    offload = {name: where in offloaded for name, where in device_map.items()}
    names = list(model.state_dict(keep_vars=True))
    attach_align_device_hook_on_blocks(
        model,
        execution_device=execution,
        offload=offload,
        offload_buffers=True,
        weights_map=SourceMap(source, names, resident),
        skip_keys=getattr(model, "_skip_keys_device_placement", None),
    )
    return Dispatch(device_map)
