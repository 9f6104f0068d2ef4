"""Per-input-channel scale folding shared by the smoothing methods (SmoothQuant, AWQ).

A mapping `prev -> into` (from the ArchSpec) lets us rewrite y = W (prev(x)) as
(W diag(s)) (diag(1/s) prev(x)): the linears' columns are multiplied by s and `prev`'s output
channels divided by s. In exact arithmetic the block computes the same function; only how hard
the weights and inputs are to quantize changes.

Calibration statistics of a linear's input are gathered once (`InputStats`); after a fold the
input of the scaled linears is x / s, so statistics are updated analytically (no new pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn

from ..models.arch import SmoothMapping
from .primitives import gram

if TYPE_CHECKING:
    from ..methods.base import BlockContext


@dataclass
class InputStats:
    """Running statistics of one linear input: per-channel max|x| and mean|x|, optionally the
    second moment H = mean x x^T (enough to evaluate any weight's output error exactly)."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    H: torch.Tensor | None = None
    tokens: int = 0

    @classmethod
    def empty(cls, n: int, device: torch.device, with_h: bool) -> InputStats:
        z = torch.zeros(n, device=device, dtype=torch.float32)
        H = torch.zeros(n, n, device=device, dtype=torch.float32) if with_h else None
        return cls(z.clone(), z.clone(), H)

    def add(self, x: torch.Tensor, x_mm: torch.Tensor | None = None) -> None:
        """x: the linear's input; x_mm: the same as the linear multiplies it (e.g. bf16 under
        autocast), for H."""
        n = x.shape[0]
        if self.H is not None:
            total = self.tokens + n
            self.H.mul_(self.tokens / total).add_(gram(x if x_mm is None else x_mm), alpha=1.0 / total)
        x = x.float()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.abssum += x.abs().sum(dim=0)
        self.tokens += n

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.tokens, 1)

    def divide_channels(self, s: torch.Tensor) -> None:
        """The input became x / s (after folding s into the op that produces it)."""
        self.absmax = self.absmax / s
        self.abssum = self.abssum / s
        if self.H is not None:
            self.H = self.H / s[:, None] / s[None, :]


@dataclass
class ResolvedMapping:
    mapping: SmoothMapping
    prev: nn.Module
    into: list[str]  # linear names (inside the block), all reading prev's output
    skipped: str | None = None  # why the mapping cannot be folded here
    info: dict = field(default_factory=dict)


def _norm_width(m: nn.Module) -> int | None:
    w = getattr(m, "weight", None)
    return None if w is None or w.dim() != 1 else w.shape[0]


def resolve_mappings(modules: dict[str, nn.Module], mappings: tuple[SmoothMapping, ...]) -> list[ResolvedMapping]:
    """The ArchSpec mappings present in a block, with the ones whose shapes forbid folding marked
    skipped (e.g. v_proj -> o_proj under grouped-query attention, where one v channel feeds
    several heads' o_proj columns, so no per-channel scale of v can be undone in o)."""
    out = []
    for m in mappings:
        into = [n for n in m.into if n in modules]
        prev = modules.get(m.prev)
        if prev is None or not into:
            continue
        r = ResolvedMapping(m, prev, into)
        widths = {modules[n].in_features for n in into}
        if len(widths) != 1:
            r.skipped = "linears of the mapping have different input widths"
        elif isinstance(prev, nn.Linear):
            if prev.out_features != widths.pop():
                r.skipped = f"{m.prev} out dim {prev.out_features} != {into[0]} in dim {modules[into[0]].in_features}"
        elif _norm_width(prev) != widths.pop():
            r.skipped = f"{m.prev} has no per-channel weight of the right width"
        out.append(r)
    return out


@torch.no_grad()
def norm_weight_offset(norm: nn.Module) -> float:
    """1.0 for norms computing x_hat * (1 + w) (Gemma), 0.0 for x_hat * w (Llama, Qwen)."""
    if isinstance(norm, nn.LayerNorm):
        return 0.0
    w = cast(torch.Tensor, norm.weight)
    saved = w.detach().clone()
    try:
        w.zero_()
        y = norm(torch.linspace(-1, 1, w.shape[0], device=w.device, dtype=w.dtype)[None])
    finally:
        w.copy_(saved)
    return 0.0 if float(y.abs().max()) == 0.0 else 1.0


@torch.no_grad()
def fold_scale(prev: nn.Module, into: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide prev's output channels by s, multiply the into-linears' input columns by s."""
    s = s.float()
    # new tensors are swapped in rather than copied into the old ones (see EngineContext.commit:
    # writing into a memory-mapped checkpoint is slow)
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
    else:
        off = norm_weight_offset(prev)
        w = cast(torch.Tensor, prev.weight)
        w.data = ((w.float() + off) / s - off).to(w.dtype)
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = (bias.float() / s).to(bias.dtype)
    for lin in into:
        lin.weight.data = (lin.weight.float() * s[None, :]).to(lin.weight.dtype)


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Mean squared output error over the calibration tokens: tr((W - Wq) H (W - Wq)^T)."""
    D = (W - Wq).float()
    return ((D @ H) * D).sum()


def collect_input_stats(ctx: BlockContext, names: list[str], with_h: bool) -> dict[str, InputStats]:
    """One pass over the calibration batches gathering InputStats of each named linear's input."""
    stats = {n: InputStats.empty(ctx.linear(n).in_features, ctx.device, with_h) for n in names}
    if names:
        ctx.collect_inputs(names, lambda n, x: stats[n].add(x, ctx.matmul_input(x)))
    return stats


def block_mappings(
    block: nn.Module, smooth: tuple[SmoothMapping, ...]
) -> tuple[dict[str, nn.Module], list[ResolvedMapping]]:
    """A block's modules by name and its smoothing mappings resolved on them."""
    modules = dict(block.named_modules())
    return modules, resolve_mappings(modules, smooth)


def representatives(names: list[str], mappings: list[ResolvedMapping]) -> dict[str, str]:
    """Linear name -> the linear whose input statistics stand for it (linears of one mapping
    read the same tensor, so one of them is observed)."""
    rep: dict[str, str] = {}
    for r in mappings:
        for n in r.into:
            rep.setdefault(n, r.into[0])
    for n in names:
        rep.setdefault(n, n)
    return rep
