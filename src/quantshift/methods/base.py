"""The method interface every quantization algorithm implements, and the shared stage options.

A method processes one decoder block at a time through a BlockContext given by the engine
(quant.engine implements it; methods never see the engine itself). Most methods are per-linear
solvers (LinearMethod): observe statistics of each linear's inputs, then solve its weights.
Transform methods (smoothing, rotations) override `process_block` directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

import torch
import torch.nn as nn
from pydantic import SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from ..config import KEEP_BITS, PER_TENSOR, StrictModel, abits_rule, group_size_rule, wbits_rule
from ..quant.primitives import QuantizedWeight, QuantSpec
from ..registry import Registry

if TYPE_CHECKING:
    from ..models.arch import ArchSpec
    from ..quant.actquant import OutputQuantizer


def regex_rule(pattern: str) -> str:
    """A module-name pattern must compile (checked when the config is read, not at the first layer)."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"invalid regex {pattern!r} ({err})") from None
    return pattern


class Override(StrictModel):
    """A per-layer rule: modules whose full name matches `pattern` (regex, search) get these."""

    pattern: str
    wbits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    abits: int | None = None
    skip: bool = False

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        return regex_rule(v)

    @field_validator("wbits")
    @classmethod
    def _wbits(cls, v: int | None) -> int | None:
        return v if v is None else wbits_rule(v)

    @field_validator("abits")
    @classmethod
    def _abits(cls, v: int | None) -> int | None:
        return v if v is None else abits_rule(v)

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        return v if v is None else group_size_rule(v)


def overrides_obey(overrides: list[Override], key: str, rule: Callable[[int, str], int]) -> None:
    """Apply a method's own rule for `key` (wbits, group_size) to its per-layer overrides too."""
    for o in overrides:
        if (v := getattr(o, key)) is not None:
            rule(v, f"overrides pattern {o.pattern!r}: ")


class StageConfig(StrictModel):
    """Options every stage has: the number format, and which linears it applies to."""

    wbits: int = 4
    group_size: int = 128
    sym: bool = False
    abits: int = KEEP_BITS  # activations stay in floating point
    act_per_token: bool = True
    targets: list[str] = [r".*"]  # regexes on full module names (inside decoder blocks)
    ignore: list[str] = [r"lm_head"]
    overrides: list[Override] = []

    @field_validator("wbits")
    @classmethod
    def _wbits(cls, v: int) -> int:
        return wbits_rule(v)

    @field_validator("abits")
    @classmethod
    def _abits(cls, v: int) -> int:
        return abits_rule(v)

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        return group_size_rule(v)

    # options of the integer weight format that a method does not take: refused when given, and
    # left out of its dump (a study ships recipes to its works as dicts that must read back)
    not_applicable: ClassVar[tuple[str, ...]] = ()
    not_applicable_hint: ClassVar[str] = ""  # "does not apply to <this>", e.g. "fp8 (use granularity)"

    @model_validator(mode="after")
    def _refuse_not_applicable(self) -> StageConfig:
        for key in self.not_applicable:
            if key in self.model_fields_set:
                raise ValueError(f"{key} does not apply to {self.not_applicable_hint}")
        return self

    @model_serializer(mode="wrap")
    def _dump_applicable(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k not in self.not_applicable}

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [regex_rule(p) for p in v]


@dataclass(frozen=True)
class LinearPlan:
    """What a stage does to one linear: weight format (None = keep) and input format."""

    weight: QuantSpec | None
    act: QuantSpec | None
    act_per_token: bool = True


def plan_for(config: StageConfig, name: str) -> LinearPlan | None:
    """The resolved plan for module `name`, or None when the stage skips it."""
    if not any(re.search(p, name) for p in config.targets) or any(re.search(p, name) for p in config.ignore):
        return None
    wbits, gs, sym, abits = config.wbits, config.group_size, config.sym, config.abits
    for rule in config.overrides:
        if re.search(rule.pattern, name):
            if rule.skip:
                return None
            wbits = rule.wbits if rule.wbits is not None else wbits
            gs = rule.group_size if rule.group_size is not None else gs
            sym = rule.sym if rule.sym is not None else sym
            abits = rule.abits if rule.abits is not None else abits
    weight = None if wbits == KEEP_BITS else QuantSpec(bits=wbits, group_size=gs, symmetric=sym)
    # activations: symmetric grids, as SmoothQuant / ZeroQuant use for dynamic per-token ranges
    act = None if abits == KEEP_BITS else QuantSpec(bits=abits, group_size=PER_TENSOR, symmetric=True)
    if weight is None and act is None:
        return None
    return LinearPlan(weight, act, config.act_per_token)


@dataclass
class SolveResult:
    weight: torch.Tensor  # new (fake-quantized) weight, same shape as the linear's
    qweight: QuantizedWeight | None = None  # codes and qparams, for export
    info: dict[str, Any] = field(default_factory=dict)  # goes into the per-layer report


class BlockContext(Protocol):
    """What a method sees of the decoder block it is processing (names are block-relative, e.g.
    "self_attn.q_proj"). The engine gives one per stage and block."""

    index: int  # the block's position in the model
    block: nn.Module
    prefix: str  # full-name prefix of the block's modules, e.g. "model.layers.3."

    # --- structure
    @property
    def device(self) -> torch.device: ...
    @property
    def arch(self) -> ArchSpec: ...
    @property
    def model_config(self) -> Any: ...  # the model's Hugging Face config
    @property
    def later_stages(self) -> list[Method]: ...  # the recipe's stages after this one
    def groups(self) -> list[list[str]]: ...  # the block's sequential groups of linears
    def linear(self, name: str) -> nn.Linear: ...
    def module(self, name: str) -> nn.Module: ...
    def full_name(self, name: str) -> str: ...
    def plan(self, config: StageConfig, name: str) -> LinearPlan | None: ...

    # --- calibration data
    @property
    def num_batches(self) -> int: ...
    @property
    def fp_inputs(self) -> bool: ...  # inputs come from the unquantized model (propagate "fp")
    def run_block(self, i: int, block: nn.Module | None = None) -> torch.Tensor: ...
    def freeze_solved(self, solved: set[str]) -> None: ...
    def matmul_input(self, x: torch.Tensor) -> torch.Tensor: ...
    def collect_inputs(
        self, names: list[str], fn: Callable[[str, torch.Tensor], None], modules: dict[str, nn.Module] | None = None
    ) -> None: ...

    # --- the statistics cache: on only where the engine decided this stage's statistics are
    # reusable (stats_cacheable, fp propagation, a store, the recipe's only stage)
    @property
    def caches_stats(self) -> bool: ...
    def load_stats(self) -> dict[str, tuple[torch.Tensor, int]] | None: ...
    def save_stats(self, stats: dict[str, tuple[torch.Tensor, int]]) -> None: ...

    # --- results
    def commit(
        self, name: str, result: SolveResult | None, plan: LinearPlan, act_scale: float | None = None
    ) -> None: ...
    def quantize_output(self, name: str, q: OutputQuantizer) -> None: ...
    def note(self, name: str, **info: Any) -> None: ...


class Method:
    """A quantization algorithm. Subclasses set name, Config, and process a block."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    kind: ClassVar[Literal["quantize", "transform"]] = "quantize"
    needs_calibration: ClassVar[bool] = True
    # set where a later weight-quantizing stage must not round this method's weights again: the
    # reason, which the recipe check (validate.check_recipe) prints
    final_weights: ClassVar[str | None] = None

    def __init__(self, config: StageConfig) -> None:
        self.config = config

    def process_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError


class LinearMethod(Method):
    """A per-linear solver run over the block's sequential groups.

    For each group: hooks feed every linear's inputs to `add_batch` over all calibration
    batches (with earlier groups already quantized), then `solve` sets its weights.
    """

    # one statistics pass for the whole block instead of one per sequential group
    true_sequential: ClassVar[bool] = True

    def new_stats(self, linear: nn.Linear) -> Any:
        return None

    def add_batch(self, stats: Any, x: torch.Tensor) -> None:  # x: [tokens, in_features]
        pass

    def solve(self, name: str, linear: nn.Linear, stats: Any, plan: LinearPlan) -> SolveResult:
        """Must not mutate `stats`: linears fed the same input share one statistics object."""
        raise NotImplementedError

    # statistics that depend only on the block's inputs and can be cached per calibration set
    # (stats_to_cache / stats_from_cache convert them), used with fp propagation
    stats_cacheable: ClassVar[bool] = False

    def stats_to_cache(self, stats: Any) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def stats_from_cache(self, tensor: torch.Tensor, tokens: int, device: torch.device) -> Any:
        raise NotImplementedError

    def process_block(self, ctx: BlockContext) -> None:
        sequential = getattr(self.config, "true_sequential", self.true_sequential)
        fp_inputs = ctx.fp_inputs
        # with fp inputs every linear is observed on the unquantized block, in one pass
        groups = ctx.groups() if sequential and not fp_inputs else [[n for g in ctx.groups() for n in g]]
        solved: set[str] = set()
        for group in groups:
            if not fp_inputs and solved:
                ctx.freeze_solved(solved)
            solved.update(group)
            plans = {n: p for n in group if (p := ctx.plan(self.config, n)) is not None}
            if not plans:
                continue
            stats: dict[str, Any] = {}
            if self.needs_calibration and any(p.weight is not None for p in plans.values()):
                stats = self._fp_stats(ctx, list(plans)) if fp_inputs else self._collect_stats(ctx, list(plans))
            for batch in _shared_batches(plans, stats):
                plan = plans[batch[0]]
                if plan.weight is None:
                    ctx.commit(batch[0], None, plan)
                    continue
                results = self.solve_shared(batch, [ctx.linear(n) for n in batch], stats.get(batch[0]), plan)
                for n, result in zip(batch, results):
                    ctx.commit(n, result, plan)

    def solve_shared(
        self, names: list[str], linears: list[nn.Linear], stats: Any, plan: LinearPlan
    ) -> list[SolveResult]:
        """Solve linears that share one statistics object and one plan (q/k/v, gate/up).
        Solvers whose rows are independent may override this to solve them as one matrix."""
        return [self.solve(n, lin, stats, plan) for n, lin in zip(names, linears)]

    def _fp_stats(self, ctx: BlockContext, names: list[str]) -> dict[str, Any]:
        """Statistics on fp inputs, through the engine's statistics cache when it keeps this
        stage's (see BlockContext.caches_stats)."""
        if ctx.caches_stats:
            got = ctx.load_stats()
            if got is not None and all(n in got for n in names):
                shared: dict[int, Any] = {}
                return {
                    n: shared.setdefault(id(got[n][0]), self.stats_from_cache(got[n][0], got[n][1], ctx.device))
                    for n in names
                }
        stats = self._collect_stats(ctx, names)
        if ctx.caches_stats:
            ctx.save_stats({n: self.stats_to_cache(s) for n, s in stats.items()})
        return stats

    def _collect_stats(self, ctx: BlockContext, names: list[str]) -> dict[str, Any]:
        """Statistics per linear; linears fed the very same tensor (q/k/v, gate/up) share one."""
        stats: dict[str, Any] = {}
        alias: dict[str, str] = {}
        # the input each linear saw last, kept alive: a freed tensor's memory can be reused by
        # the next one (gate/up's input at q/k/v's old address), which must not count as shared
        last_input: dict[str, torch.Tensor] = {}

        def same(a: torch.Tensor, b: torch.Tensor) -> bool:
            return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()

        def feed(name: str, x: torch.Tensor) -> None:
            if name in alias:
                return
            if name not in stats:  # first sight happens within the first batch
                twin = next((n for n, t in last_input.items() if same(t, x) and n not in alias), None)
                if twin is not None:
                    alias[name] = twin
                    return
                stats[name] = self.new_stats(ctx.linear(name))
            last_input[name] = x
            self.add_batch(stats[name], ctx.matmul_input(x))

        ctx.collect_inputs(names, feed)
        for name, twin in alias.items():
            stats[name] = stats[twin]
        return stats


def _shared_batches(plans: dict[str, LinearPlan], stats: dict[str, Any]) -> list[list[str]]:
    """Names grouped by (same statistics object, same plan), in order; unquantized ones alone."""
    batches: list[list[str]] = []
    for name, plan in plans.items():
        st = stats.get(name)
        mate = next(
            (
                b
                for b in batches
                if plan.weight is not None and st is not None and stats.get(b[0]) is st and plans[b[0]] == plan
            ),
            None,
        )
        if mate is None:
            batches.append([name])
        else:
            mate.append(name)
    return batches


METHODS: Registry[type[Method]] = Registry("method")
_M = TypeVar("_M", bound=type[Method])


def register(name: str) -> Callable[[_M], _M]:
    def deco(cls: _M) -> _M:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return deco


def block_plans(ctx: BlockContext, config: StageConfig) -> tuple[list[str], dict[str, LinearPlan]]:
    """The block's linears in group order, and the plan of each one this stage touches."""
    names = [n for g in ctx.groups() for n in g]
    return names, {n: p for n in names if (p := ctx.plan(config, n)) is not None}
