"""Safetensors checkpoints read and written a shard at a time.

`ShardedTensors` reads a checkpoint of one `model.safetensors` or of shards listed by an index
(`*.safetensors.index.json`, the Hugging Face layout). Opening it reads only the shard headers,
which checks at once that every shard exists, holds every tensor the index names, and is long
enough for the tensors its header lists (a truncated copy fails before any work). Tensors are
read on request, a group at a time, each shard memory-mapped only while that group is read, so a
process never holds pages of more than the tensors it asked for. A shard's sha256, when one is
expected, is checked the first time the shard is read, not in a pass over every file up front.

`ShardWriter` takes tensors as they are produced and writes a shard whenever the next tensor
would take it past `max_shard_bytes`, so at most one shard is in memory; `close()` names the
shards `model-0000k-of-0000n.safetensors` and writes the index last.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ModelError

if TYPE_CHECKING:
    import ctypes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HEADER_LIMIT = 100 * 2**20  # a header larger than this is garbage, not a header

# safetensors dtype names -> torch dtypes (the ones a model checkpoint holds)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name, relative to the checkpoint directory
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo of one safetensors file, checked against the file's length."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > _HEADER_LIMIT or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read safetensors file {path}: {err}") from None
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, stop = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"cannot read safetensors file {path}: bad header entry for {name!r}") from None
        out[name] = TensorInfo(path.name, dtype, shape, stop - begin)
        end = max(end, stop)
    if 8 + n + end > size:
        raise ModelError(f"safetensors file {path} is truncated: {size} bytes, its header needs {8 + n + end}")
    return out


def checkpoint_files(root: Path) -> list[str]:
    """The safetensors files of a Hugging Face checkpoint directory, in index order."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_index(index)
        return sorted(set(weight_map.values()))
    if (root / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    found = sorted(p.name for p in root.glob("*.safetensors"))
    if not found:
        raise ModelError(
            f"{root} has no safetensors weights (streaming reads safetensors only; convert "
            ".bin checkpoints with save_pretrained first)"
        )
    return found


def read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot read checkpoint index {path}: {err}") from None
    return {str(k): str(v) for k, v in weight_map.items()}


class ShardedTensors:
    """Lazily read tensors of the safetensors files `files` under `root` (see the module doc).

    `digests`: file -> expected sha256, checked on a file's first read; `what` names the
    directory in error messages ("model directory", "quantized model directory")."""

    def __init__(
        self,
        root: Path,
        files: Iterable[str] | None = None,
        digests: dict[str, str] | None = None,
        what: str = "model directory",
    ) -> None:
        self.root = Path(root)
        self.what = what
        self.files = list(files) if files is not None else checkpoint_files(self.root)
        self.digests = dict(digests or {})
        self._verified: set[str] = set()
        self.infos: dict[str, TensorInfo] = {}
        for fname in self.files:
            path = self.root / fname
            if not path.is_file():
                raise ModelError(f"corrupt {what} {self.root}: missing {fname}")
            for name, info in read_header(path).items():
                self.infos.setdefault(name, info)
        index = self.root / INDEX_FILE
        if index.is_file():
            for name, fname in read_index(index).items():
                got = self.infos.get(name)
                if got is None or got.file != fname:
                    raise ModelError(
                        f"corrupt {what} {self.root}: the index puts {name} in {fname}, which does not hold it"
                    )

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise ModelError(f"corrupt {self.what} {self.root}: no tensor {name}") from None

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def _verify(self, fname: str) -> None:
        if fname in self._verified:
            return
        want = self.digests.get(fname)
        if want is not None and file_sha256(self.root / fname) != want:
            raise ModelError(f"corrupt {self.what} {self.root}: {fname} does not match its sha256")
        self._verified.add(fname)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (CPU, stored dtype), each shard opened once for the group."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.info(name).file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for fname, group in by_file.items():
            self._verify(fname)
            try:
                with safe_open(str(self.root / fname), framework="pt") as f:
                    for name in group:  # a copy: the mapping closes with the file
                        out[name] = f.get_tensor(name).clone()
            except (OSError, SafetensorError) as err:
                raise ModelError(f"corrupt {self.what} {self.root}: {fname}: {str(err).splitlines()[0]}") from None
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, reading only those bytes (e.g. a slice of the vocabulary)."""
        from safetensors import safe_open

        fname = self.info(name).file
        self._verify(fname)
        with safe_open(str(self.root / fname), framework="pt") as f:
            return f.get_slice(name)[start:stop].clone()


_LIBC: list = []


_BOUNDED: list[bool] = []
MMAP_THRESHOLD = 1 << 20


def bound_allocator() -> None:
    """Keep a streaming run's resident size what it holds (glibc mallopt; once per process, by the
    streaming residencies; a no-op off glibc):

    - every host allocation of 1 MiB or more gets its own mapping, returned to the OS when freed
      (M_MMAP_THRESHOLD). glibc's default threshold adapts upwards to 32 MiB after the first large
      free, so a solver's many tensors of 1-32 MiB (a GPTQ Hessian, its factor, permuted copies)
      then live in the heap and stay resident after they are freed: measured on a 1,024-wide
      model, a streaming GPTQ block peaked at +600 MB with the default and +320 MB with this;
    - malloc arenas stay glibc's default: capping them (M_ARENA_MAX=2) was measured and changed
      nothing (benchmarks/allocator_arenas.py, 2026-12-06: GPTQ on the 51-block model of
      tests/test_streaming.py peaked at +341-342 MB in two of three runs either way, and at
      +635/+634 MB in the third, capped and not). What makes those rare ~+290 MB outliers is not
      found: a census of live tensors at each solved linear never counted more than 172 MB.
    """
    if _BOUNDED:
        return
    _BOUNDED.append(True)
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def _libc() -> ctypes.CDLL | None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand memory freed by released blocks back to the OS (glibc's malloc_trim). Without it the
    allocator keeps the freed chunks of every block it has seen (a block's tensors are below its
    mmap threshold once that has adapted), and a streaming run's resident size grows with the
    number of blocks although it never holds more than one: measured on a 51-block model,
    2.4 GB resident after streaming it, 0.4 GB once trimmed. A no-op off glibc."""
    if not _LIBC:
        libc = _libc()
        _LIBC.append(libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Writes tensors into shards of at most `max_shard_bytes` (a single larger tensor gets its
    own shard) under `out`, then names them and writes the index (see the module doc)."""

    def __init__(self, out: Path, max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.out = Path(out)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._names: set[str] = set()
        self.total_bytes = 0
        self.closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.closed:
            raise RuntimeError("ShardWriter is closed")
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self._names.add(name)
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            self.add(name, t)

    def flush(self) -> None:
        """Write the pending tensors as the next shard."""
        from safetensors.torch import save_file

        if not self._pending:
            return
        tmp = f".shard-{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, str(self.out / tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0
        return_freed_memory()  # the shard and its serialized copy

    def close(self) -> dict[str, str]:
        """Write the last shard, name all shards, write the index; returns file -> sha256."""
        self.flush()
        self.closed = True
        n = len(self._written)
        weight_map: dict[str, str] = {}
        digests: dict[str, str] = {}
        for k, (tmp, names) in enumerate(self._written, start=1):
            final = shard_name(k, n)
            os.replace(self.out / tmp, self.out / final)
            digests[final] = file_sha256(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return digests


def iter_groups(names: list[str], prefixes: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(prefix, the names under it) for each prefix, in the given order."""
    for p in prefixes:
        yield p, [n for n in names if n.startswith(p)]
