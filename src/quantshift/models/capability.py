"""What the compute device can do, read in one place, and every choice that depends on it.

Capability decides, not the device type: a V100 or a T4 is a CUDA device without bf16 units,
an AMD EPYC with AVX512-VNNI has int8 dot products and one without has none. Each choice is a
`Choice` (the kernel, and the reason whenever it is not the fast one), printed where it is made
(`quantshift device`, the packed-linear report, the quantize summary):

- dtype auto: on a CPU with bf16 matrix instructions (avx512_bf16 / amx_bf16) float32 master
  weights with bf16 autocast, on other CPUs float32 (models.precision explains why); on a CUDA
  GPU of compute capability 8.0 or later (Ampere, Ada, Hopper, Blackwell) bfloat16, on older
  ones (V100 sm70, T4 sm75) float16, since their bf16 is emulated or refused;
- int4 weight-only (W4A16): torch's tinygemm int4 kernel on CUDA sm80+ (aten._weight_int4pack_mm,
  built on sm80 tensor-core instructions) or its CPU variant; otherwise dequantize on the fly;
- int8 (W8A8): torch._int_mm on CUDA sm75+ (int8 tensor cores through cuBLASLt) or on a CPU with
  int8 dot-product instructions (VNNI / AMX); otherwise the same integer arithmetic on float GEMMs;
- fp8 (W8A8 E4M3): torch._scaled_mm on CUDA sm89+ (fp8 tensor cores: Ada, Hopper, Blackwell);
  otherwise the exact fake-quant (float weights holding the fp8 values, fake-quantized inputs).

Layer shapes can rule a kernel out too (the int4 kernels take whole groups of 32-256 columns,
cuBLAS int8 GEMMs want K and N multiples of 8, fp8 GEMMs multiples of 16); the modules that run
the kernels check those and report them the same way.

Tests and planning use `Capability` values made by hand (`fake`); `detect` reads the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

# processor flags (Linux /proc/cpuinfo names) that mean bf16 dot products in hardware
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# processor flags of the int8 dot-product instructions oneDNN's int8 GEMM uses
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
BF16_SM = (8, 0)  # bf16 tensor cores: Ampere and later
INT4_SM = (8, 0)  # the tinygemm int4 kernel's instructions
INT8_SM = (7, 5)  # int8 tensor cores usable by cuBLASLt's int8 GEMM
FP8_SM = (8, 9)  # fp8 tensor cores (torch._scaled_mm refuses older GPUs)
# torch ops a choice needs (a torch build may lack one)
OPS = ("int_mm", "scaled_mm", "int4mm_cuda", "int4mm_cpu")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first processor's flags (reads only up to its flags line: cheap on many-core machines)."""
    try:
        with Path(path).open() as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    """True when the CPU has bf16 matrix instructions (not just AVX-512 emulation)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def torch_ops() -> frozenset[str]:
    """Which of OPS this torch build has."""
    aten = torch.ops.aten
    have = {
        "int_mm": hasattr(torch, "_int_mm"),
        "scaled_mm": hasattr(torch, "_scaled_mm"),
        "int4mm_cuda": hasattr(aten, "_weight_int4pack_mm"),
        "int4mm_cpu": hasattr(aten, "_weight_int4pack_mm_for_cpu"),
    }
    return frozenset(k for k, v in have.items() if v)


@dataclass(frozen=True)
class Choice:
    """A kernel (or dtype) and, when it is not the fast one, why."""

    kernel: str
    reason: str | None = None

    def text(self) -> str:
        return self.kernel if self.reason is None else f"{self.kernel} ({self.reason})"


@dataclass(frozen=True)
class AutoDtype:
    """What dtype "auto" means on a device: weights, autocast (None: the weights'), and why."""

    weights: torch.dtype
    autocast: torch.dtype | None
    reason: str


@dataclass(frozen=True)
class Capability:
    kind: str  # torch device type: "cpu", "cuda", ...
    name: str  # "NVIDIA A100-SXM4-80GB", "AMD EPYC", "no CUDA device visible", ...
    sm: tuple[int, int] | None = None  # CUDA compute capability (None: not a CUDA GPU, or none visible)
    flags: frozenset[str] = frozenset()  # CPU flags (kind "cpu")
    ops: frozenset[str] = field(default_factory=lambda: frozenset(OPS))

    @property
    def sm_text(self) -> str:
        return f"sm{self.sm[0]}{self.sm[1]}" if self.sm else "unknown"

    @property
    def label(self) -> str:
        if self.kind == "cuda":
            return f"cuda {self.name} ({self.sm_text})" if self.sm else f"cuda ({self.name})"
        if self.kind == "cpu":
            units = sorted(f for f in self.flags if f in NATIVE_BF16_FLAGS + INT8_FLAGS)
            return f"cpu {self.name} ({', '.join(units) or 'no bf16/int8 matrix instructions'})"
        return f"{self.kind} {self.name}"

    def _gpu_below(self, need: tuple[int, int], what: str) -> str | None:
        """Why this CUDA device cannot run `what`, which needs compute capability `need`."""
        if self.sm is None:
            return "no CUDA device visible"
        if self.sm < need:
            return f"{what} needs sm{need[0]}{need[1]}+, this GPU ({self.name}) is {self.sm_text}"
        return None

    # --- the choices -------------------------------------------------------------------------

    def auto_dtype(self) -> AutoDtype:
        if self.kind == "cpu":
            if native_bf16_cpu(set(self.flags)):
                return AutoDtype(
                    torch.float32,
                    torch.bfloat16,
                    "float32 weights, bf16 autocast: this CPU has "
                    + "/".join(f for f in NATIVE_BF16_FLAGS if f in self.flags),
                )
            return AutoDtype(
                torch.float32,
                None,
                "float32: this CPU has no bf16 matrix instructions "
                f"({', '.join(NATIVE_BF16_FLAGS)}); emulated bf16 is slower",
            )
        if self.kind == "cuda":
            if self.sm is None:  # planning for GPUs this process cannot see: workers check it (studies)
                return AutoDtype(torch.bfloat16, None, "bfloat16: no CUDA device visible here, sm80+ assumed")
            if self.sm >= BF16_SM:
                return AutoDtype(torch.bfloat16, None, f"bfloat16: {self.sm_text} has bf16 tensor cores")
            return AutoDtype(
                torch.float16,
                None,
                f"float16: {self.name} ({self.sm_text}) has no bf16 units (bf16 needs sm{BF16_SM[0]}{BF16_SM[1]}+)",
            )
        return AutoDtype(torch.bfloat16, None, f"bfloat16 on {self.kind}")

    def int4(self) -> Choice:
        """The W4A16 kernel for int4 weights in whole groups of 32-256 (shapes aside)."""
        if self.kind == "cuda":
            why = self._gpu_below(INT4_SM, "the tinygemm int4 kernel")
            if why is None and "int4mm_cuda" not in self.ops:
                why = "this torch has no CUDA int4 kernel"
            return Choice("dequant", why) if why else Choice("int4mm-cuda")
        if self.kind == "cpu":
            if "int4mm_cpu" not in self.ops:
                return Choice("dequant", "this torch has no CPU int4 kernel")
            return Choice("int4mm-cpu")
        return Choice("dequant", f"no int4 kernel on device {self.kind}")

    def int8(self) -> Choice:
        """The W8A8 integer GEMM (shapes aside)."""
        if self.kind == "cuda":
            why = self._gpu_below(INT8_SM, "torch._int_mm (int8 tensor cores)")
        elif self.kind == "cpu":
            why = None if any(f in self.flags for f in INT8_FLAGS) else f"this CPU has none of {', '.join(INT8_FLAGS)}"
        else:
            why = f"device {self.kind}"
        if why is None and "int_mm" not in self.ops:
            why = "this torch has no torch._int_mm"
        return Choice("int8-emulated", why) if why else Choice("int8-intmm")

    def fp8(self) -> Choice:
        """The W8A8 fp8 GEMM (shapes aside); the fallback is the exact fake-quant ("float")."""
        if self.kind == "cuda":
            why = self._gpu_below(FP8_SM, "torch._scaled_mm (fp8 tensor cores)")
        else:
            why = (
                f"fp8 GEMMs run on sm{FP8_SM[0]}{FP8_SM[1]}+ GPUs (torch._scaled_mm); on {self.kind} fp8 runs as "
                "the exact fake-quant"
            )
        if why is None and "scaled_mm" not in self.ops:
            why = "this torch has no torch._scaled_mm"
        return Choice("float", why) if why else Choice("fp8-scaled-mm")

    def lines(self) -> list[str]:
        """Every choice with its reason, as `quantshift device` prints them."""
        auto = self.auto_dtype()
        return [
            f"device: {self.label}",
            f"dtype auto: {auto.reason}",
            f"int4 weights (W4A16): {self.int4().text()}",
            f"int8 W8A8: {self.int8().text()}",
            f"fp8 W8A8: {self.fp8().text()}",
        ]


def fake(
    kind: str = "cuda",
    sm: tuple[int, int] | None = None,
    name: str | None = None,
    flags: set[str] | frozenset[str] = frozenset(),
    ops: set[str] | frozenset[str] | None = None,
) -> Capability:
    """A capability made by hand (tests; planning for a device this process cannot see)."""
    default = {"cuda": f"GPU sm{sm[0]}{sm[1]}" if sm else "no CUDA device visible", "cpu": "CPU"}
    return Capability(
        kind, name or default.get(kind, kind), sm, frozenset(flags), frozenset(OPS if ops is None else ops)
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def detect(device: torch.device | str = "cpu", flags: set[str] | None = None) -> Capability:
    """The capability of `device` on this machine ("auto" is not a device: resolve it first).
    `flags`: CPU flags to use instead of reading /proc/cpuinfo."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    ops = torch_ops()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return Capability("cuda", "no CUDA device visible", None, frozenset(), ops)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        sm = tuple(torch.cuda.get_device_capability(index))
        return Capability("cuda", torch.cuda.get_device_name(index), (int(sm[0]), int(sm[1])), frozenset(), ops)
    if dev.type == "cpu":
        return Capability("cpu", _cpu_name(), None, frozenset(cpu_flags() if flags is None else flags), ops)
    return Capability(dev.type, dev.type, None, frozenset(), ops)
