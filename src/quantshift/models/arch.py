"""Architecture knowledge as data: where the decoder blocks are and how their linears group.

The block engine, the smoothing transforms and the exporters read an ArchSpec; nothing else in
quantshift knows about model families. Unknown families fall back to a generic spec that
finds the block list and treats every linear of a block as one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch.nn as nn


@dataclass(frozen=True)
class SmoothMapping:
    """A scale folded into `prev` (a norm or linear) and undone in the linears `into`.

    `prev` names a module inside the block; `into` lists linears that read its output.
    """

    prev: str
    into: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    blocks_path: str  # attribute path from the CausalLM to the ModuleList of decoder blocks
    backbone_path: str  # attribute path to the module that maps input_ids -> hidden states
    groups: tuple[tuple[str, ...], ...]  # sequential groups of linear names inside a block
    smooth: tuple[SmoothMapping, ...] = field(default_factory=tuple)
    needs_bos: bool = False  # every evaluation window must start with BOS

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return cast(nn.ModuleList, _get(model, self.blocks_path))

    def backbone(self, model: nn.Module) -> nn.Module:
        return _get(model, self.backbone_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the backbone applies after the last block (its output feeds the head)."""
        backbone = self.backbone(model)
        for name in _FINAL_NORMS:
            if hasattr(backbone, name):
                return getattr(backbone, name)
        raise ValueError(f"cannot find the final norm of {self.name} (looked for {', '.join(_FINAL_NORMS)})")

    def block_groups(self, block: nn.Module) -> list[list[str]]:
        """Sequential groups present in this block (generic spec: all linears, one group)."""
        if not self.groups:
            return [[n for n, m in block.named_modules() if isinstance(m, nn.Linear)]]
        present = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        out = [[n for n in g if n in present] for g in self.groups]
        missing = present - {n for g in out for n in g}
        if missing:  # linears the spec does not know still get quantized, last
            out.append(sorted(missing))
        return [g for g in out if g]


_FINAL_NORMS = ("norm", "final_layer_norm", "final_layernorm", "ln_f")


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_SMOOTH = (
    SmoothMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    SmoothMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothMapping("mlp.up_proj", ("mlp.down_proj",)),
)
# Gemma3 norms: pre_feedforward_layernorm feeds the MLP; post_* norms act on outputs.
_GEMMA3_SMOOTH = (
    SmoothMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    SmoothMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothMapping("mlp.up_proj", ("mlp.down_proj",)),
)

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", "model", _LLAMA_GROUPS, _LLAMA_SMOOTH),
    "mistral": ArchSpec("mistral", "model.layers", "model", _LLAMA_GROUPS, _LLAMA_SMOOTH),
    "qwen2": ArchSpec("qwen2", "model.layers", "model", _LLAMA_GROUPS, _LLAMA_SMOOTH),
    "qwen3": ArchSpec("qwen3", "model.layers", "model", _LLAMA_GROUPS, _LLAMA_SMOOTH),
    "gemma3_text": ArchSpec("gemma3_text", "model.layers", "model", _LLAMA_GROUPS, _GEMMA3_SMOOTH, needs_bos=True),
    "gemma2": ArchSpec("gemma2", "model.layers", "model", _LLAMA_GROUPS, _GEMMA3_SMOOTH, needs_bos=True),
}

_GENERIC_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def arch_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in ARCHS:
        return ARCHS[model_type]
    for path in _GENERIC_PATHS:
        try:
            blocks = _get(model, path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return ArchSpec(f"generic:{model_type}", path, path.rsplit(".", 1)[0], ())
    raise ValueError(f"cannot find the decoder blocks of model type {model_type!r}")
