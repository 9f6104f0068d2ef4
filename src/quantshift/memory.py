"""Memory as a planned resource: what each stage of a run needs, from shapes alone, and whether
it runs with the whole model in memory or streams it from disk a block at a time.

The plan reads the model's config (a skeleton on the meta device: no weights) and estimates the
peak host and device bytes of each stage:

- quantize in memory: the whole model in its compute dtype, plus the codes of every quantized
  linear (one byte per weight until saved), plus one block's solver state and the calibration
  activations;
- quantize streaming: one block in the compute dtype, its stored copy while it is read, the
  solver state (GPTQ-family Hessians and their inverses), the activations, the embeddings during
  the capture, and one output shard while it is written;
- evaluate in memory: the model, one batch's activations, one scoring tile;
- evaluate streaming: one block, the hidden states of the windows of a pass, one slice of the
  output projection, one scoring tile (lm-eval tasks: accelerate's offload hooks keep what fits
  of the model resident and read the rest per forward).

Each estimate adds the process's own resident size when planned (Python, torch, transformers).
`--max-memory cpu=16GiB,cuda:0=70GiB` caps host and device; without it the host cap is the
memory the OS reports available and the device cap the free memory of the compute device. A
stage runs in memory when that fits the cap, streams when only streaming fits, and otherwise
fails before any work with one line naming the stage, the estimate and the cap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
HOST = "cpu"


def parse_size(text: str) -> int:
    """'16GiB', '500MB', '2.5G', '1048576' -> bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"cannot read memory size {text!r}: use a number with a unit, e.g. 16GiB, 500MB")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryCaps:
    """Host and per-device byte caps; None: not capped by the user (the plan uses what is free)."""

    host: int | None = None
    devices: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        parts = [f"cpu={fmt_bytes(self.host)}"] if self.host is not None else []
        parts += [f"{d}={fmt_bytes(v)}" for d, v in self.devices.items()]
        return ",".join(parts) or "none"


def parse_max_memory(text: str | None) -> MemoryCaps:
    """'cpu=16GiB,cuda:0=70GiB' -> MemoryCaps (None or '' -> no caps)."""
    if not text:
        return MemoryCaps()
    host: int | None = None
    devices: dict[str, int] = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not re.fullmatch(r"cpu|cuda(:\d+)?|\d+", key):
            raise ConfigError(
                f"--max-memory {text!r}: each part is DEVICE=SIZE with DEVICE cpu, cuda or cuda:N "
                f"(e.g. cpu=16GiB,cuda:0=70GiB); got {part.strip()!r}"
            )
        size = parse_size(value)
        if size <= 0:
            raise ConfigError(f"--max-memory {text!r}: {key} must be more than 0 bytes")
        if key == HOST:
            host = size
        else:
            devices["cuda:0" if key == "cuda" else (f"cuda:{key}" if key.isdigit() else key)] = size
    return MemoryCaps(host, devices)


def available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def free_device_bytes(device: str) -> int | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model, read from its config on the meta device."""

    name: str
    params: int  # every parameter (a tied weight once)
    block_params: int  # the largest decoder block
    blocks: int
    hidden: int
    vocab: int
    embed_params: int  # input embedding
    head_params: int  # output projection (0 when tied to the embedding)
    linears: tuple[tuple[int, int], ...]  # [out, in] of the largest block's linears
    # [rows, in] of each problem a GPTQ-family solver solves at once in that block (linears fed
    # the same input, q/k/v and gate/up, are stacked by rows)
    problems: tuple[tuple[int, int], ...] = ()
    stored_bytes: int | None = None  # the checkpoint's weight bytes on disk, when known
    stored_dtype_bytes: int = 4  # bytes per stored float parameter (bf16 checkpoints: 2)

    @property
    def linear_params(self) -> int:
        return self.blocks * sum(o * i for o, i in self.linears)


def shape_of_config(config: Any, name: str, stored_bytes: int | None = None) -> ModelShape:
    import torch
    import torch.nn as nn

    from .models.arch import arch_for
    from .models.lazy import empty_model, tied_sources

    model = empty_model(config, torch.float32)
    arch = arch_for(model)
    blocks = arch.blocks(model)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    big = blocks[sizes.index(max(sizes))]
    linears = tuple((m.out_features, m.in_features) for m in big.modules() if isinstance(m, nn.Linear))
    mods = dict(big.named_modules())
    problems = []
    for group in arch.block_groups(big):  # one input per group in known architectures
        ins = {mods[n].in_features for n in group}
        problems += [(sum(mods[n].out_features for n in group if mods[n].in_features == i), i) for i in sorted(ins)]
    get_in: Any = getattr(model, "get_input_embeddings")  # noqa: B009 (typed as a Tensor by nn.Module)
    get_out: Any = getattr(model, "get_output_embeddings")  # noqa: B009
    emb, head = get_in(), get_out()
    params = sum(p.numel() for p in model.parameters())
    tied = bool(tied_sources(model))
    if tied and head is not None and head.weight is not emb.weight:  # one stored tensor, counted once
        params -= head.weight.numel()
    head_params = 0 if tied or head is None else head.weight.numel()
    text = getattr(config, "get_text_config", lambda: config)()
    dtype = str(getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "float32")
    per = 2 if ("16" in dtype) else 4
    if stored_bytes:
        per = min(4, max(1, round(stored_bytes / max(1, params))))
    return ModelShape(
        name,
        params,
        max(sizes),
        len(blocks),
        int(text.hidden_size),
        int(emb.weight.shape[0]),
        emb.weight.numel(),
        head_params,
        linears,
        tuple(problems),
        stored_bytes,
        per,
    )


def model_shape(name: str) -> ModelShape:
    """The shape of a model by name (bundled alias, local or quantized directory, hub id)."""
    from transformers import AutoConfig

    from .checkpoint import is_quantized_dir, read_quant_info
    from .errors import ModelError
    from .models.load import model_path
    from .models.shards import ShardedTensors

    path = model_path(name)
    quantized = isinstance(path, Path) and is_quantized_dir(path)
    info = read_quant_info(Path(path)) if quantized else None  # a corrupt record is named as such
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        what = f"corrupt quantized model directory {path}" if quantized else f"cannot read the config of {name!r}"
        raise ModelError(f"{what}: {str(err).splitlines()[0]}") from None
    stored = None
    if info is not None:  # a missing or truncated shard fails here, before anything is printed or loaded
        stored = ShardedTensors(
            Path(path), list(info.get("files") or {}), what="quantized model directory"
        ).total_bytes()
    elif isinstance(path, Path):
        try:
            stored = ShardedTensors(path).total_bytes()
        except ModelError:  # not safetensors (.bin): the size on disk is not needed to plan
            stored = None
    return shape_of_config(config, name, stored)


@dataclass(frozen=True)
class StagePlan:
    stage: str  # "quantize", "evaluate"
    mode: str  # "in memory" | "streaming"
    host: int  # estimated peak host bytes
    device: int = 0  # estimated peak bytes on the compute device (0 on the CPU)
    parts: tuple[tuple[str, int], ...] = ()  # what the estimate is made of

    def line(self) -> str:
        dev = f", device ~{fmt_bytes(self.device)}" if self.device else ""
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts if v)
        return f"{self.stage:9s} {self.mode:10s} peak host ~{fmt_bytes(self.host)}{dev} ({parts})"


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    caps: MemoryCaps
    host_cap: int  # the cap the plan used (user's or available memory)
    device: str
    stages: tuple[StagePlan, ...]
    shard_bytes: int  # output shard size when quantizing

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    def streams(self, name: str) -> bool:
        return any(s.stage == name and s.mode == "streaming" for s in self.stages)

    def lines(self) -> list[str]:
        s = self.shape
        stored = f", {fmt_bytes(s.stored_bytes)} on disk" if s.stored_bytes else ""
        head = (
            f"memory plan for {s.name} ({s.params / 1e9:.2f}B params, {s.blocks} blocks{stored}); "
            f"host cap {fmt_bytes(self.host_cap)}" + ("" if self.caps.host is not None else " (available now)")
        )
        return [head] + [f"  {st.line()}" for st in self.stages]


def _solver_bytes(shape: ModelShape, calibrated: bool) -> int:
    """One block's solver peak (float32): for the problem solved at once, its Hessian as collected,
    the factorization's permuted copy (factored in place) and the inverse factor (three in x in
    matrices: methods.gptq, quant.primitives.damped_inverse_cholesky), plus the weight as the
    caller passes it, its transposed copy, the solution and the codes (about four rows x in)."""
    problems = shape.problems or tuple(shape.linears)
    if not problems:
        return 0
    if not calibrated:  # round to nearest: a weight copy and its codes
        return max(3 * r * i * 4 for r, i in problems)
    # the factorization (three Hessians and two copies of the weight) or the column loop (the
    # collected Hessian, the inverse factor, the weight, its transpose, the solution and codes)
    return max(max(3 * i * i * 4 + 2 * r * i * 4, 2 * i * i * 4 + 4 * r * i * 4) for r, i in problems)


def plan_memory(
    shape: ModelShape,
    *,
    device: str = "cpu",
    weight_bytes: int = 4,
    caps: MemoryCaps | None = None,
    calib_tokens: int = 0,
    calibrated: bool = True,
    quantize: bool = True,
    evaluate: bool = True,
    eval_batch: int = 4,
    eval_seqlen: int = 512,
    eval_windows: int = 64,
    packed_eval: bool = False,
    baseline: int | None = None,
) -> MemoryPlan:
    """Estimates (see the module doc) and the mode of each stage within the caps; raises a
    ConfigError naming the stage when even streaming does not fit."""
    caps = caps or MemoryCaps()
    base = process_rss() if baseline is None else baseline
    host_cap = caps.host if caps.host is not None else available_host_bytes()
    on_gpu = device.startswith("cuda")
    act = 4  # activations and hidden states are float32 on the CPU (bf16 autocast keeps the residual stream)
    s = shape
    stages = []
    block = s.block_params * weight_bytes
    shard = int(min(512 * 2**20, max(64 * 2**20, host_cap // 32)))  # checkpoint.DEFAULT_SHARD_BYTES at most
    if quantize:
        acts = 4 * calib_tokens * s.hidden * act
        solver = _solver_bytes(s, calibrated)
        codes = s.linear_params  # uint8 codes of every quantized linear, held until saved
        # loading converts the stored copy into the compute dtype (both exist for a moment); saving
        # holds one shard and its serialized copy
        load = s.params * s.stored_dtype_bytes if s.stored_dtype_bytes != weight_bytes else 0
        in_mem = [
            ("model", s.params * weight_bytes),
            ("codes", codes),
            ("load or save", max(load, 2 * shard, solver + acts)),
            ("process", base),
        ]
        # a block is read a module at a time; on the CPU the capture fills only the embedding rows
        # it looks up (models.lazy.materialize_rows), elsewhere the whole table
        stored_module = max((o * i for o, i in s.linears), default=0) * s.stored_dtype_bytes
        capture = s.embed_params * weight_bytes if on_gpu else 0
        # while a block is solved, the output shard being filled waits beside it; a shard is
        # written (and serialized once more) between blocks, when the solver's memory is free
        streaming = [
            ("block", block),
            ("block work", max(solver + shard, stored_module, capture, 2 * shard)),
            ("activations", acts),
            ("process", base),
        ]
        # on a GPU every Hessian of the block is collected there before the first is solved
        # (an H200, 7B shapes: 3.85 GiB peak against 2.8 GiB estimated without them)
        hessians = sum(i * i * 4 for _r, i in (s.problems or ())) if calibrated else 0
        stages.append(_choose("quantize", in_mem, streaming, host_cap, on_gpu, block + solver + acts + hessians))
    if not evaluate:
        return MemoryPlan(shape, caps, host_cap, device, tuple(stages), shard)
    # evaluation.scoring: one tile of logits and its exponentials
    tile = 3 * min(1024, eval_batch * eval_seqlen) * 16384 * 4
    per_batch = (
        eval_batch * eval_seqlen * max(s.hidden * 8, s.hidden + 3 * max((o for o, _ in s.linears), default=0)) * act
    )
    model_bytes = (s.stored_bytes or s.params * 2) if packed_eval else s.params * weight_bytes
    in_mem = [("model", model_bytes), ("activations", per_batch), ("scoring", tile), ("process", base)]
    hidden = 2 * eval_windows * eval_seqlen * s.hidden * act
    head_slice = 16384 * s.hidden * weight_bytes
    streaming = [
        ("block", block),
        ("hidden states", hidden),
        ("activations", per_batch),
        ("head slice", max(s.embed_params * weight_bytes if on_gpu else 0, head_slice + tile)),
        ("process", base),
    ]
    # in memory on a GPU the whole model sits on the device: only where it fits the device's cap
    # (or its free memory); else its blocks stream through it like the quantizer's
    whole = model_bytes + per_batch + tile
    dev_limit = device_limit(caps, device) if on_gpu else None
    fits_device = dev_limit is None or whole <= dev_limit
    stages.append(
        _choose(
            "evaluate",
            in_mem,
            streaming,
            host_cap,
            on_gpu,
            block + per_batch + tile,
            whole_on_device=whole if fits_device else None,
        )
    )
    return MemoryPlan(shape, caps, host_cap, device, tuple(stages), shard)


def device_cap(caps: MemoryCaps, device: str) -> int | None:
    """The user's cap for `device` ("cuda" means cuda:0), if any."""
    return caps.devices.get(device if ":" in device else f"{device}:0")


def device_limit(caps: MemoryCaps, device: str) -> int | None:
    """The bytes a plan may use on `device`: the user's cap, else what is free now (None on a CPU)."""
    cap = device_cap(caps, device)
    return cap if cap is not None else free_device_bytes(device)


def _choose(
    stage: str,
    in_mem: list[tuple[str, int]],
    streaming: list[tuple[str, int]],
    host_cap: int,
    on_gpu: bool,
    device_need: int,
    whole_on_device: int | None = -1,
) -> StagePlan:
    """`whole_on_device`: on a GPU, what the device holds when the stage runs in memory (-1: the
    weights stay on the host and the device holds one block's work either way; None: the whole
    model does not fit the device, so the stage streams)."""
    mem, stream = sum(v for _k, v in in_mem), sum(v for _k, v in streaming)
    if on_gpu:
        in_memory = mem <= host_cap and whole_on_device is not None
        device = whole_on_device if in_memory and whole_on_device is not None and whole_on_device >= 0 else device_need
        return StagePlan(
            stage,
            "in memory" if in_memory else "streaming",
            mem if in_memory else min(mem, stream),
            device,
            tuple(in_mem if in_memory else streaming),
        )
    if mem <= host_cap:
        return StagePlan(stage, "in memory", mem, 0, tuple(in_mem))
    if stream <= host_cap:
        return StagePlan(stage, "streaming", stream, 0, tuple(streaming))
    raise ConfigError(
        f"{stage} needs ~{fmt_bytes(stream)} of host memory even streaming one block at a time "
        f"(~{fmt_bytes(mem)} in memory), over the cap of {fmt_bytes(host_cap)}: raise --max-memory, "
        "or use fewer calibration tokens / a smaller --batch-size"
    )


def check_device_cap(plan: MemoryPlan) -> None:
    """A device cap below one block's work fails before any work."""
    cap = device_cap(plan.caps, plan.device)
    limit = device_limit(plan.caps, plan.device)
    for st in plan.stages:
        if limit is not None and st.device > limit:
            raise ConfigError(
                f"{st.stage} needs ~{fmt_bytes(st.device)} on {plan.device} for one block, over "
                f"{'the cap' if cap is not None else 'the free memory'} of {fmt_bytes(limit)}"
            )


def windows_per_pass(plan: MemoryPlan, seqlen: int, batch: int) -> int | None:
    """How many windows' hidden states a streamed perplexity pass may hold within the cap
    (None: all of them)."""
    s = plan.shape
    fixed = sum(v for k, v in plan.stage("evaluate").parts if k != "hidden states")
    room = plan.host_cap - fixed
    per_window = 2 * seqlen * s.hidden * 4
    n = room // per_window if per_window else 0
    if n <= 0:
        return batch
    return max(batch, int(math.floor(n / batch)) * batch)


def resident_budget(plan: MemoryPlan) -> int:
    """Bytes of weights that may stay resident in host memory when a model on disk runs whole
    (accelerate's offload hooks): the cap less everything the evaluation holds besides the model, and 10%."""
    others = sum(v for k, v in plan.stage("evaluate").parts if k not in ("model", "block", "hidden states"))
    return max(0, int(plan.host_cap * 0.9) - others)


def device_resident_budget(plan: MemoryPlan) -> int | None:
    """Likewise on the GPU: its cap (or free memory) less a batch's activations and a logits tile,
    and 10% (None on a CPU, or a GPU torch cannot see)."""
    if not plan.device.startswith("cuda"):
        return None
    limit = device_limit(plan.caps, plan.device)
    if limit is None:
        return None
    work = sum(v for k, v in plan.stage("evaluate").parts if k in ("activations", "scoring", "head slice"))
    return max(0, int(limit * 0.9) - work)


def plan_for_model(
    name: str | Path,
    *,
    device: str | None = None,
    dtype: str = "auto",
    max_memory: Any = None,
    quantize: bool = True,
    evaluate: bool = True,
    calib_tokens: int = 0,
    calibrated: bool = True,
    batch_size: int = 4,
    seqlen: int = 512,
    max_windows: int | None = 64,
    backend: str = "fake",
    shape: ModelShape | None = None,
) -> MemoryPlan:
    """The memory plan of quantizing and/or evaluating a model by name (quantshift.api.memory_plan):
    each stage's estimated peak host/device bytes and whether it runs in memory or streams, within
    `max_memory` ("cpu=16GiB,cuda:0=70GiB", a MemoryCaps, or None: what is free) on `device` (None
    or "auto": the GPU when there is one); `shape`: the model's, when the caller has read it already.
    Raises a ConfigError when even streaming does not fit."""
    from .models.load import resolve_device
    from .models.precision import resolve_precision

    name, device = str(name), resolve_device(device or "auto")

    caps = max_memory if isinstance(max_memory, MemoryCaps) else parse_max_memory(max_memory)
    precision = resolve_precision(dtype, device)
    plan = plan_memory(
        shape or model_shape(name),
        device=device,
        weight_bytes=precision.weights.itemsize,
        caps=caps,
        calib_tokens=calib_tokens,
        calibrated=calibrated,
        quantize=quantize,
        evaluate=evaluate,
        eval_batch=batch_size,
        eval_seqlen=seqlen,
        eval_windows=max_windows or 64,
        packed_eval=backend == "packed",
    )
    check_device_cap(plan)
    return plan
