"""Synthetic Llama-shaped checkpoints of any size, for memory and speed tests without a download.

Random weights (seeded per tensor, so any tensor can be regenerated alone) scaled so that
activations stay finite through any depth: projections into a block ~ N(0, 1/in), projections
back into the residual stream (o_proj, down_proj) further divided by sqrt(2 x layers), norms at
one, embeddings ~ N(0, 1). The tokenizer is the bundled SmolLM2's (49,152 tokens), so every
text source and task works on it. Written as sharded bf16 safetensors with an index, one shard
in memory at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from .shards import ShardWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class SyntheticShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 49152
    tie_embeddings: bool = False

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        block = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * block + embed + self.hidden

    @classmethod
    def for_params(
        cls,
        target: float,
        hidden: int,
        intermediate: int | None = None,
        heads: int | None = None,
        kv_heads: int | None = None,
        vocab: int = 49152,
        tie_embeddings: bool = False,
    ) -> SyntheticShape:
        """The depth that brings a model of this width closest to `target` parameters."""
        inter = intermediate or int(round(hidden * 8 / 3 / 256)) * 256
        h = heads or max(1, hidden // 128)
        one = cls(hidden, inter, 1, h, kv_heads or h, vocab, tie_embeddings)
        per_layer = one.params() - cls(hidden, inter, 0, h, kv_heads or h, vocab, tie_embeddings).params()
        fixed = one.params() - per_layer
        layers = max(1, round((target - fixed) / per_layer))
        return cls(hidden, inter, layers, h, kv_heads or h, vocab, tie_embeddings)


def _config(shape: SyntheticShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
    }


def tensor_specs(shape: SyntheticShape) -> Iterator[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) of every tensor, in checkpoint order; std 0 means a norm (ones)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // shape.heads)
    out_scale = 1.0 / math.sqrt(2 * shape.layers)
    yield "model.embed_tokens.weight", (shape.vocab, h), 1.0
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,), 0.0
        yield p + "self_attn.q_proj.weight", (h, h), 1 / math.sqrt(h)
        yield p + "self_attn.k_proj.weight", (kv, h), 1 / math.sqrt(h)
        yield p + "self_attn.v_proj.weight", (kv, h), 1 / math.sqrt(h)
        yield p + "self_attn.o_proj.weight", (h, h), out_scale / math.sqrt(h)
        yield p + "post_attention_layernorm.weight", (h,), 0.0
        yield p + "mlp.gate_proj.weight", (i, h), 1 / math.sqrt(h)
        yield p + "mlp.up_proj.weight", (i, h), 1 / math.sqrt(h)
        yield p + "mlp.down_proj.weight", (h, i), out_scale / math.sqrt(i)
    yield "model.norm.weight", (h,), 0.0
    if not shape.tie_embeddings:
        yield "lm_head.weight", (shape.vocab, h), 1 / math.sqrt(h)


def make_tensor(name: str, dims: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    if std == 0.0:
        return torch.ones(dims, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(dims, dtype=torch.bfloat16)
    flat = out.view(-1)
    step = 1 << 24  # float32 temporaries of 64 MB at most
    for s in range(0, flat.numel(), step):
        n = min(step, flat.numel() - s)
        flat[s : s + n] = torch.randn(n, generator=g).mul_(std).to(torch.bfloat16)
    return out


def write_synthetic(
    out: Path,
    shape: SyntheticShape,
    seed: int = 0,
    shard_bytes: int = 2 * 2**30,
    progress: bool = True,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write the checkpoint directory `out` (config, tokenizer, sharded bf16 weights + index).

    The tokenizer is copied from `tokenizer_dir`, else from the bundled SmolLM2 (converted once);
    a machine without the bundled model's packages (a bare GPU image) passes the files' folder."""
    from tqdm.auto import tqdm

    from .bundled import bundled_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_config(shape), indent=2))
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else bundled_checkpoint("smollm2-135m")
    if not (tok_dir / "tokenizer.json").is_file():
        raise ModelError(f"no tokenizer.json in {tok_dir}")
    for f in TOKENIZER_FILES:
        if (tok_dir / f).is_file():
            shutil.copy2(tok_dir / f, out / f)
    writer = ShardWriter(out, shard_bytes)
    specs = list(tensor_specs(shape))
    total = sum(math.prod(d) * 2 for _n, d, _s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="synthetic weights", disable=not progress) as bar:
        for name, dims, std in specs:
            writer.add(name, make_tensor(name, dims, std, seed))
            bar.update(math.prod(dims) * 2)
    writer.close()
    (out / "synthetic.json").write_text(
        json.dumps({"shape": asdict(shape), "seed": seed, "params": shape.params()}, indent=2)
    )
    return out
