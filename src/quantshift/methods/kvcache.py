"""K/V cache fake quantization: keys and values are rounded as a quantized cache would store them.

Forward hooks on the key and value projections fake-quantize their outputs on a `bits` integer
grid with one dynamic range per token and head ("head", the usual cache layout) or per token
over all heads ("token"). Recorded in quantshift.json (output_quantizers), restored on reload.

Approximation: the hook sits on k_proj's output, before RoPE (and before Gemma/Qwen3's k_norm);
a real cache stores post-RoPE keys. Per-head ranges change a little under the rotation, errors do
not change in kind. Put this stage last or first; it does not touch weights and needs no data.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator

from ..config import PER_TENSOR
from ..quant.actquant import OutputQuantizer
from ..quant.primitives import QuantSpec
from .base import BlockContext, Method, StageConfig, register

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class KVCacheConfig(StageConfig):
    bits: int = 8
    granularity: Literal["head", "token"] = "head"
    kv_sym: bool = False
    targets: list[str] = [r"self_attn\.k_proj$", r"self_attn\.v_proj$"]

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"bits must be 2..8, got {v}")
        return v

    not_applicable = ("wbits", "abits", "group_size", "sym", "act_per_token", "overrides")
    not_applicable_hint = "kvcache (options: bits, granularity, kv_sym, targets, ignore)"


def _head_dim(config: PretrainedConfig) -> int:
    hd = getattr(config, "head_dim", None)
    return hd if hd else config.hidden_size // config.num_attention_heads


@register("kvcache")
class KVCache(Method):
    """Per-token (per-head) dynamic fake quantization of key/value projection outputs."""

    Config = KVCacheConfig
    config: KVCacheConfig
    needs_calibration = False

    def process_block(self, ctx: BlockContext) -> None:
        c = self.config
        spec = QuantSpec(bits=c.bits, group_size=PER_TENSOR, symmetric=c.kv_sym)
        head_dim = _head_dim(ctx.model_config) if c.granularity == "head" else None
        for n in (n for g in ctx.groups() for n in g):
            full = ctx.full_name(n)
            if not any(re.search(p, full) for p in c.targets) or any(re.search(p, full) for p in c.ignore):
                continue
            if head_dim is not None and ctx.linear(n).out_features % head_dim:
                raise ValueError(
                    f"{full}: output width {ctx.linear(n).out_features} is not a multiple of head_dim {head_dim}"
                )
            ctx.quantize_output(n, OutputQuantizer(spec, head_dim))
