"""Which floating-point precision a model is stored in and computes in.

`--dtype auto` picks from the device's capability (models.capability): on a GPU with bf16
tensor cores (sm80+), bfloat16 weights, on an older GPU (V100, T4) float16; on a CPU with native
bf16 matrix units (AVX512-BF16 or AMX-BF16, read from the processor's flags), float32 master
weights with bf16 autocast, so matrix products run on those units (about 3.8x a float32 GEMM
here) while weights, solved grids, Hessians and the residual stream stay float32; on any other
CPU, float32 (emulated bf16 GEMMs are slower than float32 ones). The precision is part of every
result's identity: `Precision.name` goes into cache keys and reports; `Precision.reason` says why
"auto" chose it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..errors import ModelError
from . import capability as _cap
from .capability import NATIVE_BF16_FLAGS, Capability, cpu_flags, native_bf16_cpu

__all__ = ["NATIVE_BF16_FLAGS", "Precision", "compute_context", "cpu_flags", "native_bf16_cpu", "resolve_precision"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_SHORT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # what the parameters are stored in
    autocast: torch.dtype | None = None  # matrix products run in this dtype (None: the weights')
    reason: str = field(default="", compare=False)  # why "auto" chose this ("" for an explicit dtype)

    @property
    def name(self) -> str:
        base = _SHORT[self.weights]
        return base if self.autocast is None else f"{base}+{_SHORT[self.autocast]}-autocast"

    def context(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """Forward passes run inside this: autocast when set, else nothing changes."""
        return compute_context(device, self.autocast)


def compute_context(device: torch.device | str, autocast: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `autocast` on the device's type, or nothing when it is None."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=autocast)


def resolve_precision(
    dtype: str, device: str, flags: set[str] | None = None, capability: Capability | None = None
) -> Precision:
    """`dtype` as the user gave it (auto or a dtype name) on the compute `device`; "auto" asks
    the device's capability (`capability`, else detected; `flags`: CPU flags to use instead)."""
    if dtype == "auto":
        auto = (capability or _cap.detect(device, flags)).auto_dtype()
        return Precision(auto.weights, auto.autocast, auto.reason)
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(_DTYPES)}")
    return Precision(_DTYPES[dtype])
