"""The one sequential block engine every method runs on.

1. Capture, for each calibration batch, the hidden states entering the first decoder block and
   the keyword arguments every block receives (position embeddings, masks, ...), by swapping the
   blocks for recorders and running the backbone once (no block compute, no lm_head).
2. For each block: move it to the compute device, let each recipe stage process it (stages see
   the block as earlier stages left it), then run the *quantized* block over the calibration
   batches to produce the next block's inputs.

Blocks may live on the CPU while one block at a time runs on the GPU. The calibration
activations stay on the GPU when they fit easily (see `activation_home`), else on the CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import NumericalError
from ..methods.base import LinearPlan, Method, SolveResult, StageConfig, plan_for
from ..models.arch import ArchSpec
from ..models.precision import compute_context
from .actquant import InputQuantizer, OutputQuantizer
from .pinned import active_pool
from .primitives import QuantizedWeight, QuantSpec
from .statstore import CalibIdentity, StatsStore


class _StopForward(Exception):
    """Raised by a hook once every linear a pass needs has seen its input."""


class _StandIn(nn.Module):
    """Temporarily takes a module's place; attribute reads fall through to it (model code may read
    a block's attributes), and it is not a submodule, so the module tree stays unchanged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)


class _Recorder(_StandIn):
    """Stands in for a decoder block during capture: records inputs, returns them unchanged."""

    def __init__(
        self, inner: nn.Module, index: int, sink: Callable[[int, torch.Tensor, dict], None], stop: bool = False
    ) -> None:
        super().__init__(inner)
        self._index = index
        self._sink = sink
        self._stop = stop  # the last block: end the forward here (the final norm and head are not needed)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder blocks called with extra positional arguments are not supported")
        self._sink(self._index, hidden_states, kwargs)
        if self._stop:
            raise _StopForward
        return hidden_states


class _Replay(_StandIn):
    """Stands in for a block child whose output on the current batch is already known."""

    def __init__(self, inner: nn.Module, output: Any) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_output", output)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output


class FrozenOutputs:
    """Outputs of a block's children whose weights are final for the current stage.

    A sequential method reruns the block once per group of linears; once, say, q/k/v and o are
    solved, the attention sub-module's output no longer changes, so the passes for the MLP
    groups and the propagation pass can replay it instead of recomputing attention (on a CPU
    the most expensive part of a 512-token block). The first pass after a child is frozen
    records its output per batch; later passes replay it. Recomputing would give the very same
    tensors (same inputs, weights and kernels), so results do not change."""

    def __init__(self, num_batches: int, home: torch.device) -> None:
        self.num_batches = num_batches
        self.home = home
        self.outputs: dict[str, list[Any]] = {}

    def freeze(self, block: nn.Module, solved: set[str]) -> None:
        """Freeze every direct child of `block` whose linears are all in `solved`."""
        for name, child in block.named_children():
            linears = [f"{name}.{n}" if n else name for n, m in child.named_modules() if isinstance(m, nn.Linear)]
            if linears and name not in self.outputs and all(n in solved for n in linears):
                self.outputs[name] = []

    @contextlib.contextmanager
    def applied(self, block: nn.Module, batch: int, device: torch.device) -> Iterator[None]:
        swapped: dict[str, nn.Module] = {}
        handles = []
        for name, outs in self.outputs.items():
            child = getattr(block, name)
            if len(outs) == self.num_batches:
                swapped[name] = child
                setattr(block, name, _Replay(child, _to(outs[batch], device)))
            elif len(outs) == batch:  # recording, in batch order

                def keep(_m: nn.Module, _a: tuple[Any, ...], out: Any, outs: list[Any] = outs) -> None:
                    outs.append(_map_tensors(out, lambda t: _to_home(t.detach(), self.home)))

                handles.append(child.register_forward_hook(keep))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for name, child in swapped.items():
                setattr(block, name, child)


ACTIVATION_MODES = ("auto", "device", "offload")
PROPAGATE_MODES = ("quantized", "fp")  # what the next block is calibrated on: the quantized or the fp outputs


def check_activation_mode(mode: str) -> None:
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")


def activation_home(mode: str, compute: torch.device, need_bytes: int, free_bytes: int | None) -> torch.device:
    """Where calibration activations live between passes. Every block runs several passes over
    them (one per sequential group, one to propagate), so on a GPU keeping them there saves
    copying all of them across the bus each pass; "auto" does so when a block's inputs and
    outputs together take at most a quarter of the free memory, and otherwise offloads them to
    the CPU, so that a model bigger than the GPU still quantizes."""
    check_activation_mode(mode)
    if compute.type == "cpu" or mode == "offload":
        return torch.device("cpu")
    if mode == "device" or (free_bytes is not None and need_bytes <= free_bytes // 4):
        return compute
    return torch.device("cpu")


def _to_home(t: torch.Tensor, home: torch.device) -> torch.Tensor:
    """A copy on `home`; offloaded from a GPU into pinned memory, so copies back can overlap,
    in a buffer of the open pinned pool (quant.pinned) when there is one."""
    if home.type == "cpu" and t.is_cuda:
        pool = active_pool()
        if pool is not None:
            return pool.copy(t)
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.to(home)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """fn applied to every tensor in nested tuples, lists and dicts (rebuilt as plain ones)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device | str) -> Any:
    return _map_tensors(obj, lambda t: t.to(device, non_blocking=True))


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN/inf; one device-to-host read for the whole list."""
    if not tensors:
        return True
    sums = [t.sum(dtype=torch.float32).to(tensors[0].device) for t in tensors]  # see collect_inputs
    return bool(torch.isfinite(torch.stack(sums)).all())


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class QuantizedModule:
    """What the engine did to one linear, for saving, export and the report."""

    stage: str
    qweight: QuantizedWeight | None
    act: dict | None  # InputQuantizer.to_dict()
    info: dict[str, Any] = field(default_factory=dict)
    out: dict | None = None  # OutputQuantizer.to_dict() (e.g. K/V cache quantization)
    shape: tuple[int, int] | None = None  # [out, in] of the linear
    spec: QuantSpec | None = None  # the codes' format, kept when the codes are released

    @property
    def weight_spec(self) -> QuantSpec | None:
        return self.qweight.spec if self.qweight is not None else self.spec

    def release_codes(self) -> None:
        """Drop the codes once written to disk (streaming), keeping their format for the report."""
        if self.qweight is not None:
            self.spec, self.qweight = self.qweight.spec, None


@dataclass
class EngineResult:
    modules: dict[str, QuantizedModule]
    blocks: list[dict[str, Any]]
    seconds: float
    # what transform-only stages did to modules no later stage quantized (e.g. smoothing scales)
    transforms: dict[str, dict] = field(default_factory=dict)


class EngineContext:
    """The engine's methods.base.BlockContext: one block, as one stage (`method`) processes it;
    `stage` names what made the changes in the report ("propagate" for the engine's own passes)."""

    def __init__(
        self, engine: BlockEngine, index: int, block: nn.Module, stage: str, method: Method | None = None
    ) -> None:
        self.engine = engine
        self.index = index
        self.block = block
        self.stage = stage
        self.method = method
        self.prefix = f"{engine.arch.blocks_path}.{index}."
        self._modules = dict(block.named_modules())

    # --- structure -----------------------------------------------------------------
    def groups(self) -> list[list[str]]:
        return self.engine.arch.block_groups(self.block)

    def linear(self, name: str) -> nn.Linear:
        return self._modules[name]

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def full_name(self, name: str) -> str:
        return self.prefix + name

    def plan(self, config: StageConfig, name: str) -> LinearPlan | None:
        return plan_for(config, self.full_name(name))

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def arch(self) -> ArchSpec:
        return self.engine.arch

    @property
    def model_config(self) -> Any:
        return self.engine.model.config

    @property
    def later_stages(self) -> list[Method]:
        stages = self.engine.stages
        at = next((i for i, s in enumerate(stages) if s is self.method), None)
        return stages[at + 1 :] if at is not None else []

    # --- calibration data ----------------------------------------------------------
    @property
    def num_batches(self) -> int:
        return len(self.engine.inputs)

    @property
    def fp_inputs(self) -> bool:
        return self.engine.propagate == "fp"

    @property
    def caches_stats(self) -> bool:
        return self.method is not None and self.method is self.engine.cached_stage

    def load_stats(self) -> dict[str, tuple[torch.Tensor, int]] | None:
        store, calib = self.engine.stats_store, self.engine.calib
        if not self.caches_stats or store is None or calib is None:
            return None
        return store.load_block(calib, self.index)

    def save_stats(self, stats: dict[str, tuple[torch.Tensor, int]]) -> None:
        store, calib = self.engine.stats_store, self.engine.calib
        if self.caches_stats and store is not None and calib is not None:
            store.save_block(calib, self.index, stats)

    def batch(self, i: int) -> tuple[torch.Tensor, dict]:
        """Block input and kwargs of calibration batch i, on the compute device."""
        return self.engine.inputs[i].to(self.device, non_blocking=True), self.engine.kwargs_for(self.index, i)

    def run_block(self, i: int, block: nn.Module | None = None) -> torch.Tensor:
        """The block's output on calibration batch i, in the engine's compute precision (frozen
        children of the block being quantized replayed, see FrozenOutputs)."""
        x, kw = self.batch(i)
        frozen = self.engine.frozen if block is None else None
        with self.engine.compute(), frozen.applied(self.block, i, self.device) if frozen else contextlib.nullcontext():
            return _block_output((block or self.block)(x, **kw))

    def freeze_solved(self, solved: set[str]) -> None:
        """Tell the engine these linears (block-relative names) are final for this stage."""
        if self.engine.frozen is not None:
            self.engine.frozen.freeze(self.block, solved)

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the linear it feeds multiplies it: cast to the autocast dtype when one is set, so
        statistics (Hessians) describe the products the model really computes."""
        dt = self.engine.autocast
        return x if dt is None or x.dtype == dt else x.to(dt)

    def collect_inputs(
        self, names: list[str], fn: Callable[[str, torch.Tensor], None], modules: dict[str, nn.Module] | None = None
    ) -> None:
        """Run the block over every calibration batch, calling fn(name, x[tokens, in]) for the
        input of each named module; the forward stops once all of them have fired."""
        if self.engine.from_store_only:
            raise RuntimeError("no calibration activations: this run takes every statistic from the cache")
        mods = modules or self._modules
        seen: set[str] = set()
        # per module: did any batch hold NaN/inf; a device flag, read once after all batches
        nonfinite: dict[str, torch.Tensor] = {}

        def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                # one reduction instead of a bool tensor the size of x: a float32 sum is finite
                # exactly when every element is (short of a sum beyond 3e38, which is not sane either)
                bad = ~torch.isfinite(x.sum(dtype=torch.float32))
                nonfinite[name] = bad if name not in nonfinite else nonfinite[name] | bad
                with torch.autocast(x.device.type, enabled=False):  # statistics stay in float32
                    fn(name, x.reshape(-1, x.shape[-1]))
                seen.add(name)
                if len(seen) == len(names):
                    raise _StopForward

            return hook

        handles = [mods[n].register_forward_pre_hook(make_hook(n)) for n in names]
        try:
            with torch.no_grad():
                for i in range(self.num_batches):
                    seen.clear()
                    try:
                        self.run_block(i)
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        for name in names:
            if name in nonfinite and bool(nonfinite[name]):
                raise NumericalError(
                    f"calibration inputs of {self.full_name(name)} (block {self.index}, stage "
                    f"{self.stage}) contain NaN/inf{self.engine.nonfinite_hint()}"
                )

    # --- results -------------------------------------------------------------------
    def commit(self, name: str, result: SolveResult | None, plan: LinearPlan, act_scale: float | None = None) -> None:
        """Write a solved weight into the linear and attach its input quantizer if any
        (`act_scale`: a calibrated static per-tensor input scale instead of dynamic ranges)."""
        lin = self.linear(name)
        full = self.full_name(name)
        prev = self.engine.modules.get(full)
        if result is not None and not bool(torch.isfinite(result.weight).all()):
            raise NumericalError(
                f"stage {self.stage} solved NaN/inf weights for {full} (block {self.index})"
                f"{self.engine.nonfinite_hint()}"
            )
        if result is not None:
            # swap in the solved tensor instead of copying into the old one: a freshly loaded
            # checkpoint is memory-mapped, and writing into it page by page (copy on write)
            # costs more than solving a small model's linear
            lin.weight.data = result.weight.detach().to(lin.weight.dtype).contiguous()
        act = None
        if plan.act is not None:
            q = InputQuantizer(plan.act, plan.act_per_token, act_scale)
            self.engine.attach_act(full, lin, q)
            act = q.to_dict()
        elif prev is not None:
            act = prev.act
        info = dict(result.info) if result is not None else {}
        if plan.weight is not None:
            info.setdefault("wbits", plan.weight.bits)
            info.setdefault("format", plan.weight.describe())
        if act is not None:
            info["abits"] = act["spec"]["bits"]
        self.engine.residency.settle()  # the solver's temporaries are free now
        self.engine.modules[full] = QuantizedModule(
            self.stage,
            result.qweight if result is not None else (prev.qweight if prev else None),
            act,
            info,
            prev.out if prev is not None else None,
            (lin.out_features, lin.in_features),
            prev.spec if prev is not None and result is None else None,
        )

    def quantize_output(self, name: str, q: OutputQuantizer) -> None:
        """Attach a run-time output quantizer (forward hook) to a module and record it."""
        full = self.full_name(name)
        self.engine.attach_out(full, self.module(name), q)
        entry = self.engine.modules.get(full)
        if entry is None:
            entry = self.engine.modules[full] = QuantizedModule(self.stage, None, None, {})
            mod = self.module(name)
            if isinstance(mod, nn.Linear):
                entry.shape = (mod.out_features, mod.in_features)
        entry.out = q.to_dict()
        entry.info["out_bits"] = q.spec.bits

    def note(self, name: str, **info: Any) -> None:
        """Record transform information for a module (e.g. smoothing scales) in the report."""
        full = self.full_name(name)
        entry = self.engine.modules.get(full)
        if entry is None:
            self.engine.transforms.setdefault(full, {}).update(info)
        else:
            entry.info.update(info)


class InMemoryBlocks:
    """Blocks held in memory (on the CPU or wherever they were loaded): each moves to the compute
    device while the engine works on it, then back. The engine's default residency; the
    streaming quantizer's (pipeline.StreamedBlocks) reads each block from disk instead and
    writes it out when done."""

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}
        self._outer: dict[str, torch.device] = {}

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        p = next(block.parameters(), None)
        self._home[index] = p.device if p is not None else torch.device("cpu")
        block.to(device)

    def done(self, index: int, block: nn.Module, engine: BlockEngine) -> None:
        block.to(self._home.pop(index))

    def load_outer(self, modules: dict[str, nn.Module], device: torch.device, ids: torch.Tensor | None = None) -> None:
        """Embeddings, rotary tables, final norm: to the compute device for the capture (`ids`:
        the token ids it will look up; a residency streaming from disk reads only their rows)."""
        for name, child in modules.items():
            p: torch.Tensor | None = next(child.parameters(), None)
            p = next(child.buffers(), None) if p is None else p
            self._outer[name] = p.device if p is not None else torch.device("cpu")
            child.to(device)

    def release_outer(self, modules: dict[str, nn.Module]) -> None:
        for name, child in modules.items():
            child.to(self._outer.pop(name))

    def settle(self) -> None:
        """Called after each solved linear; a residency bounding host memory returns freed memory here."""


class BlockEngine:
    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        stages: list[Method],
        device: str | torch.device,
        batch_size: int = 8,
        progress: bool = True,
        propagate: str = "quantized",
        stats_store: StatsStore | None = None,
        calib: CalibIdentity | None = None,
        activations: str = "auto",
        autocast: torch.dtype | None = None,
        reuse_outputs: bool = True,
        residency: Any = None,
    ) -> None:
        if propagate not in PROPAGATE_MODES:
            raise ValueError(f"propagate must be one of {PROPAGATE_MODES}, got {propagate!r}")
        check_activation_mode(activations)  # before any work, not at capture
        self.activations = activations
        # forwards (capture, statistics passes, propagation) run under autocast to this dtype;
        # solvers, Hessians and weights stay float32 (see models.precision)
        self.autocast = autocast
        self.reuse_outputs = reuse_outputs  # replay outputs of finished sub-modules (FrozenOutputs)
        self.frozen: FrozenOutputs | None = None
        # quantized: each block is calibrated on the outputs of the already quantized blocks
        # (GPTQ's default); fp: on the unquantized model's activations, so per-block statistics
        # do not depend on the recipe and can be cached in stats_store by calibration set
        self.propagate = propagate
        self.stats_store = stats_store
        self.calib = calib
        # the one stage whose statistics go through stats_store, decided here once: with fp
        # propagation a block's inputs do not depend on the recipe, and only a recipe's single
        # stage sees the block unchanged by an earlier stage
        only = stages[0] if len(stages) == 1 else None
        cacheable = propagate == "fp" and stats_store is not None and calib is not None
        self.cached_stage = only if cacheable and getattr(only, "stats_cacheable", False) else None
        self.from_store_only = False  # every statistic comes from the store: no forward pass at all
        self.model = model
        self.arch = arch
        self.stages = stages
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.inputs: list[torch.Tensor] = []  # per calibration batch, on self.home
        self._kwargs: list[list[dict]] = []  # [block][batch] kwargs, on self.home
        self.home = torch.device("cpu")  # where activations live; set by capture
        self.modules: dict[str, QuantizedModule] = {}
        self.transforms: dict[str, dict] = {}
        self.act_handles: dict[str, Any] = {}
        self.out_handles: dict[str, Any] = {}
        # where blocks live between uses: InMemoryBlocks, or pipeline.StreamedBlocks (from disk)
        self.residency = residency if residency is not None else InMemoryBlocks()

    def _store_has_everything(self, n_blocks: int) -> bool:
        """True when the only stage takes cacheable statistics and the store holds all blocks'."""
        return (
            self.cached_stage is not None
            and self.stats_store is not None
            and self.calib is not None
            and self.stats_store.complete(self.calib, n_blocks)
        )

    def compute(self) -> contextlib.AbstractContextManager:
        return compute_context(self.device, self.autocast)

    def nonfinite_hint(self) -> str:
        """What to try when activations or weights turn NaN/inf (appended to the error)."""
        if self.autocast == torch.float16:
            return "; float16 activations overflow easily: quantize in bfloat16 or float32"
        return "; check the model in full precision, or an earlier stage of the recipe"

    def kwargs_for(self, block: int, batch: int) -> dict:
        return _to(self._kwargs[block][batch], self.device)

    def attach_act(self, full: str, linear: nn.Module, q: InputQuantizer) -> None:
        if full in self.act_handles:
            self.act_handles[full].remove()
        self.act_handles[full] = linear.register_forward_pre_hook(q)

    def attach_out(self, full: str, module: nn.Module, q: OutputQuantizer) -> None:
        if full in self.out_handles:
            self.out_handles[full].remove()
        self.out_handles[full] = module.register_forward_hook(q)

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> None:
        blocks = self.arch.blocks(self.model)
        n_blocks = len(blocks)
        self._kwargs = [[] for _ in range(n_blocks)]
        self.inputs = []
        home: list[torch.device] = []
        # blocks get the same kwarg tensors (position embeddings, masks) in one forward: one copy each
        copies: dict[tuple, torch.Tensor] = {}

        def keep_one(t: torch.Tensor) -> torch.Tensor:
            key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
            if key not in copies:
                copies[key] = _to_home(t.detach(), home[0])
            return copies[key]

        def sink(i: int, h: torch.Tensor, kw: dict) -> None:
            if not home:  # a block's inputs and outputs, all batches
                need = 2 * input_ids.numel() * h.shape[-1] * h.element_size()
                free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
                home.append(activation_home(self.activations, self.device, need, free))
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            if i == 0:
                copies.clear()  # a new batch: its tensors may reuse freed addresses
                self.inputs.append(_to_home(h.detach(), home[0]))
            self._kwargs[i].append(_map_tensors(kw, keep_one))

        originals = list(blocks)
        backbone = self.arch.backbone(self.model)
        outer = self._non_block_modules(backbone, blocks)
        self.residency.load_outer(outer, self.device, input_ids)
        try:
            for i in range(n_blocks):
                blocks[i] = _Recorder(originals[i], i, sink, stop=i == n_blocks - 1)
            for start in range(0, input_ids.shape[0], self.batch_size):
                ids = input_ids[start : start + self.batch_size].to(self.device)
                with self.compute():
                    try:
                        backbone(input_ids=ids, use_cache=False)
                    except _StopForward:  # the last block's inputs are recorded: nothing after them is needed
                        pass
        finally:
            for i in range(n_blocks):
                blocks[i] = originals[i]
            self.residency.release_outer(outer)
        if home:
            self.home = home[0]

    @staticmethod
    def _non_block_modules(backbone: nn.Module, blocks: nn.ModuleList) -> dict[str, nn.Module]:
        """The backbone's children other than the blocks (embeddings, rotary tables, final norm)."""
        block_ids = {id(b) for b in blocks}
        return {
            name: child
            for name, child in backbone.named_children()
            if child is not blocks and id(child) not in block_ids
        }

    def run(self, input_ids: torch.Tensor | None) -> EngineResult:
        t0 = time.time()
        needs_data = any(s.needs_calibration for s in self.stages)
        blocks = self.arch.blocks(self.model)
        self.from_store_only = needs_data and self._store_has_everything(len(blocks))
        run_forward = needs_data and not self.from_store_only
        if run_forward:
            if input_ids is None:
                raise ValueError("this recipe needs calibration data")
            self.capture(input_ids)
            if not _all_finite(self.inputs):
                raise NumericalError(
                    f"the calibration inputs of block 0 ({self.arch.blocks_path}.0) contain NaN/inf: "
                    f"the embeddings produced them{self.nonfinite_hint()}"
                )
        report: list[dict[str, Any]] = []
        bar = tqdm(range(len(blocks)), desc="quantizing blocks", disable=not self.progress, unit="block")
        for i in bar:
            tb = time.time()
            block = blocks[i]
            self.residency.load(i, block, self.device)
            reference: list[torch.Tensor] = []
            if run_forward:
                # the unquantized block's outputs, computed before any stage changes it: batch 0 for
                # the report's error, every batch when they are the next block's inputs (fp)
                ctx = EngineContext(self, i, block, "reference")
                with torch.no_grad():
                    n_ref = len(self.inputs) if self.propagate == "fp" else 1
                    reference = [_to_home(ctx.run_block(b), self.home) for b in range(n_ref)]
            for stage in self.stages:
                # outputs frozen by an earlier stage are stale once this one changes weights
                self.frozen = FrozenOutputs(len(self.inputs), self.home) if run_forward and self.reuse_outputs else None
                stage.process_block(EngineContext(self, i, block, stage.name, stage))
            entry: dict[str, Any] = {"block": i}
            if run_forward:
                ctx = EngineContext(self, i, block, "propagate")
                with torch.no_grad():
                    if self.propagate == "fp":
                        q_out = ctx.run_block(0)
                        outs = reference
                    else:
                        outs = [ctx.run_block(b) for b in range(len(self.inputs))]
                        q_out = outs[0]
                if not _all_finite(outs):  # the next block's calibration inputs
                    raise NumericalError(
                        f"block {i} ({self.arch.blocks_path}.{i}) outputs NaN/inf on the calibration "
                        f"data after quantization{self.nonfinite_hint()}"
                    )
                ref_out = reference[0].to(q_out.device)
                err = (q_out.float() - ref_out.float()).pow(2).sum() / ref_out.float().pow(2).sum().clamp_min(1e-30)
                entry["out_rel_err"] = float(err)
                self.inputs = [o if o.device == self.home else _to_home(o, self.home) for o in outs]
                del reference, ref_out
            elif self.from_store_only:
                entry["statistics"] = "cached"
            self.frozen = None
            self.residency.done(i, block, self)
            entry["seconds"] = round(time.time() - tb, 3)
            report.append(entry)
            if "out_rel_err" in entry:
                bar.set_postfix(rel_err=f"{entry['out_rel_err']:.2e}")
        self.inputs, self._kwargs = [], []
        return EngineResult(self.modules, report, time.time() - t0, self.transforms)
