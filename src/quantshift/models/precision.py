"""Which floating-point precision a model is stored in and computes in.

`--dtype auto` picks per machine: on a GPU, bfloat16 weights; on a CPU with native bf16 matrix
units (AVX512-BF16 or AMX-BF16, read from the processor's flags), float32 master weights with
bf16 autocast, so matrix products run on those units (about 3.8x a float32 GEMM here) while
weights, solved grids, Hessians and the residual stream stay float32; on any other CPU, float32
(emulated bf16 GEMMs are slower than float32 ones). The precision is part of every result's
identity: `Precision.name` goes into cache keys and reports.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_SHORT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# processor flags (Linux /proc/cpuinfo names) that mean bf16 dot products in hardware
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # what the parameters are stored in
    autocast: torch.dtype | None = None  # matrix products run in this dtype (None: the weights')

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


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    """True when the CPU has bf16 matrix instructions (not just AVX-512 emulation)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_precision(dtype: str, device: str, flags: set[str] | None = None) -> Precision:
    """`dtype` as the user gave it (auto or a dtype name) on the compute `device`."""
    if dtype == "auto":
        if not str(device).startswith("cpu"):
            return Precision(torch.bfloat16)
        return Precision(torch.float32, torch.bfloat16 if native_bf16_cpu(flags) else None)
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(_DTYPES)}")
    return Precision(_DTYPES[dtype])
