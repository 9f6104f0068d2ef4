"""Models whose weights stay on disk until a module needs them.

A model is built as a skeleton on the meta device (accelerate's `init_empty_weights`: shapes and
dtypes, no storage; buffers computed at construction, such as rotary tables, stay real). A
*weight source* maps the skeleton's state-dict names to tensors read from safetensors shards:

- `CheckpointSource`: an ordinary Hugging Face checkpoint (weights as stored);
- `FakeQuantSource`: a quantized directory as the fake-quant model sees it (a quantized
  linear's `weight` is its dequantized codes, sparse outliers applied);
- `quant.inference.PackedSource`: a quantized directory whose linears are inference modules,
  built from their codes when read.

`materialize` fills a module's meta tensors from a source, on a device, casting floating-point
tensors to the model's dtype (a float32 master copy of a bf16 checkpoint is exact); `release`
puts them back on meta. The engine, the block-streamed evaluation and accelerate's offload hooks
(as their `weights_map`) all read weights through a source, one module or block at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ModelError
from .shards import ShardedTensors, bound_allocator, return_freed_memory


def empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device, in `dtype`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):  # a checkpoint quantized by another tool: not ours to rebuild
        raise ModelError("this checkpoint carries a quantization_config of another tool; load it with transformers")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tied_sources(model: nn.Module) -> dict[str, str]:
    """State-dict name -> the name its value is stored under, for weights tied to another
    (the output projection tied to the input embedding); empty when nothing is tied."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    if not getattr(text, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return {str(k): str(v) for k, v in keys.items()}
    get_out: Any = getattr(model, "get_output_embeddings")  # noqa: B009 (typed as a Tensor by nn.Module)
    get_in: Any = getattr(model, "get_input_embeddings")  # noqa: B009
    out_emb, in_emb = get_out(), get_in()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is None or id(out_emb) not in names or id(in_emb) not in names:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


class WeightSource:
    """State-dict names of a model -> tensors, read from disk on request (see the module doc)."""

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype a float tensor is stored in on disk (None: not stored as such)."""
        return None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor (a slice of the output projection)."""
        return self.read([name])[name][start:stop]


class CheckpointSource(WeightSource):
    """An unquantized Hugging Face checkpoint directory."""

    def __init__(self, root: Path, model: nn.Module) -> None:
        self.tensors = ShardedTensors(Path(root))
        self.aliases = {k: v for k, v in tied_sources(model).items() if k not in self.tensors}
        expected = set(model.state_dict(keep_vars=True))
        missing = sorted(n for n in expected if self._stored(n) not in self.tensors)
        if missing:
            raise ModelError(
                f"checkpoint {root} lacks {len(missing)} tensors the model needs, e.g. {missing[0]} "
                "(an architecture whose checkpoint names need conversion cannot stream)"
            )

    def _stored(self, name: str) -> str:
        return self.aliases.get(name, name)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        got = self.tensors.read({self._stored(n) for n in names})
        return {n: got[self._stored(n)] for n in names}

    def stored_dtype(self, name: str) -> torch.dtype | None:
        stored = self._stored(name)
        return self.tensors.info(stored).dtype if stored in self.tensors else None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors.read_rows(self._stored(name), start, stop)


class FakeQuantSource(WeightSource):
    """A quantized directory as the fake-quant model: quantized weights dequantized on read.
    `model`: the skeleton whose state-dict names it must serve (all of them are checked)."""

    def __init__(self, qdir: Any, model: nn.Module, skip_owners: set[str] | None = None) -> None:
        # qdir: a checkpoint.QuantizedDir (typed loosely: checkpoint imports this module)
        self.qdir = qdir
        floats = set(qdir.float_names())
        self.aliases = {k: v for k, v in tied_sources(model).items() if k not in floats}
        self.quantized = {f"{n}.weight": n for n in qdir.specs}
        skip = skip_owners or set()
        expected = {n for n in model.state_dict(keep_vars=True) if n.rsplit(".", 1)[0] not in skip}
        expected |= {f"{n}.weight" for n in skip}
        missing = sorted(n for n in expected if n not in self.quantized and self.aliases.get(n, n) not in floats)
        unexpected = sorted(floats - expected - set(self.aliases.values()))
        if missing or unexpected:
            raise ModelError(
                f"corrupt quantized model directory {qdir.path}: missing {missing[:3]} unexpected {unexpected[:3]}"
            )

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {n: self.qdir.dense_weight(self.quantized[n]) for n in names if n in self.quantized}
        rest = [n for n in names if n not in self.quantized]
        got = self.qdir.tensors.read({self.aliases.get(n, n) for n in rest})
        out.update({n: got[self.aliases.get(n, n)] for n in rest})
        return out

    def stored_dtype(self, name: str) -> torch.dtype | None:
        stored = self.aliases.get(name, name)
        return self.qdir.tensors.info(stored).dtype if stored in self.qdir.tensors else None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.quantized:
            return self.read([name])[name][start:stop]
        return self.qdir.tensors.read_rows(self.aliases.get(name, name), start, stop)


def meta_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(full name, owning module, attribute, tensor) of every parameter and persistent buffer
    of `module` still on the meta device."""
    for mod_name, mod in module.named_modules():
        non_persistent: set[str] = getattr(mod, "_non_persistent_buffers_set", set())
        tensors: list[tuple[str, torch.Tensor | None]] = list(mod._parameters.items())
        tensors += [(k, v) for k, v in mod._buffers.items() if k not in non_persistent]
        for attr, t in tensors:
            if t is not None and t.is_meta:
                full = f"{prefix}{mod_name}.{attr}" if mod_name else f"{prefix}{attr}"
                yield full, mod, attr, t


def _set(mod: nn.Module, attr: str, value: torch.Tensor) -> torch.Tensor:
    if attr in mod._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        mod._parameters[attr] = value
    else:
        mod._buffers[attr] = value
    return value


def materialize(module: nn.Module, prefix: str, source: WeightSource, device: torch.device | str) -> int:
    """Fill every meta tensor of `module` (state-dict names `prefix` + its own) from `source` on
    `device`, one owning module at a time (so only one module's stored tensors are held beside
    the result), floating-point values cast to the dtype the skeleton gave the tensor (the
    model's dtype; a packed module's bfloat16 scales keep theirs). Returns the bytes materialized."""
    groups: dict[int, list[tuple[str, nn.Module, str, torch.Tensor]]] = {}
    shared: dict[int, torch.Tensor] = {}  # a meta tensor held by several modules (tied): filled once
    for item in meta_tensors(module, prefix):
        groups.setdefault(id(item[1]), []).append(item)
    total = 0
    for todo in groups.values():
        got = source.read([full for full, _m, _a, meta in todo if id(meta) not in shared])
        for full, mod, attr, meta in todo:
            if id(meta) in shared:
                _set(mod, attr, shared[id(meta)])
                continue
            value = got.pop(full)
            if tuple(value.shape) != tuple(meta.shape):
                raise ModelError(
                    f"{full} has shape {tuple(value.shape)} on disk, the model expects {tuple(meta.shape)}"
                )
            value = value.to(device=device, dtype=meta.dtype if value.is_floating_point() else value.dtype)
            shared[id(meta)] = _set(mod, attr, value)
            total += value.numel() * value.element_size()
        del got
        return_freed_memory()  # the stored copies and unpacking temporaries of this module
    return total


EMBEDDING_ROWS = 4096  # rows of a stored embedding read at a time


def materialize_rows(
    embedding: nn.Embedding, prefix: str, source: WeightSource, device: torch.device | str, ids: torch.Tensor
) -> None:
    """An input embedding filled only at the rows of the token ids `ids` (all the capture looks
    up). On the CPU the rest of the table is allocated but never written, so its pages are never
    resident: a 128k x 8192 float32 table costs the few MB of the rows used instead of 4 GB. On
    other devices the whole table is materialized."""
    if torch.device(device).type != "cpu":
        materialize(embedding, prefix, source, device)
        return
    meta = embedding.weight
    weight = torch.empty(meta.shape, dtype=meta.dtype)
    needed = torch.unique(ids.reshape(-1).cpu())
    name = f"{prefix}weight"
    for start in range(0, meta.shape[0], EMBEDDING_ROWS):
        stop = min(start + EMBEDDING_ROWS, meta.shape[0])
        sel = needed[(needed >= start) & (needed < stop)]
        if sel.numel():
            weight[sel] = source.read_rows(name, start, stop).to(meta.dtype)[sel - start]
    _set(embedding, "weight", weight)


def materialize_all(model: nn.Module, source: WeightSource, device: torch.device | str) -> None:
    """The whole model in memory, tied weights stored once."""
    retie(model)
    materialize(model, "", source, device)


def release(module: nn.Module) -> None:
    """Put every parameter and persistent buffer of `module` back on the meta device."""
    for mod in module.modules():
        non_persistent: set[str] = getattr(mod, "_non_persistent_buffers_set", set())
        for attr, t in list(mod._parameters.items()):
            if t is not None and not t.is_meta:
                _set(mod, attr, torch.empty_like(t, device="meta"))  # a Parameter again, on meta
        for attr, buf in list(mod._buffers.items()):
            if buf is not None and not buf.is_meta and attr not in non_persistent:
                mod._buffers[attr] = torch.empty_like(buf, device="meta")


def retie(model: nn.Module) -> None:
    """Tie the output projection to the input embedding where the config ties them (a skeleton
    built under init_empty_weights holds two meta tensors)."""
    modules = dict(model.named_modules())
    for key, src in tied_sources(model).items():
        owner, _, attr = key.rpartition(".")
        s_owner, _, s_attr = src.rpartition(".")
        if owner in modules and s_owner in modules:
            modules[owner]._parameters[attr] = modules[s_owner]._parameters[s_attr]


class SourceBlocks:
    """Block residency (see quant.engine.InMemoryBlocks) for a model whose weights stay on disk:
    a block is materialized from `source` on the compute device when needed and released to meta
    afterwards; so are the backbone's other children around the capture."""

    def __init__(self, source: WeightSource, blocks_path: str, backbone_path: str) -> None:
        self.source, self.blocks_path, self.backbone_path = source, blocks_path, backbone_path
        bound_allocator()  # freed block and solver memory goes back to the OS at once

    def prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        materialize(block, self.prefix(index), self.source, device)

    def done(self, index: int, block: nn.Module, engine: Any) -> None:
        release(block)
        return_freed_memory()

    def load_outer(self, modules: dict[str, nn.Module], device: torch.device, ids: torch.Tensor | None = None) -> None:
        for name, child in modules.items():
            prefix = f"{self.backbone_path}.{name}."
            if isinstance(child, nn.Embedding) and ids is not None:
                materialize_rows(child, prefix, self.source, device, ids)
            else:
                materialize(child, prefix, self.source, device)

    def release_outer(self, modules: dict[str, nn.Module]) -> None:
        for child in modules.values():
            release(child)
        return_freed_memory()

    def settle(self) -> None:
        """After each solved linear: its solver's temporaries go back to the OS (see
        shards.return_freed_memory), so a block's peak is its own, not the sum of its linears'."""
        return_freed_memory()


def checkpoint_dtypes(root: Path) -> dict[str, torch.dtype]:
    """Stored dtype of each tensor of a checkpoint directory (headers only)."""
    return {n: i.dtype for n, i in ShardedTensors(Path(root)).infos.items()}
