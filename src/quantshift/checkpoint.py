"""Quantized model directories: what a quantization run writes and `eval`/`export` reload.

    DIR/config.json, tokenizer files      the base model's config and tokenizer
    DIR/model-0000k-of-0000n.safetensors  shards of every tensor (the Hugging Face sharded layout),
    DIR/model.safetensors.index.json      tensor -> shard, written last
    DIR/quantshift.json                   recipe, calibration manifest, per-module formats and shapes,
                                          input quantizers, versions, sha256 of every shard
    DIR/report.json                       per-layer and per-block errors and timings

Format 2 (this writer): a quantized linear `L` is stored as `L.qweight` (its codes packed densely
as a little-endian bit stream per row, quant.primitives.pack_bits: a W4 weight takes half a byte
per parameter, W3 three eighths), `L.scales` (float32), `L.zeros` (uint8 when every zero point is
an integer code, else float32), and `L.g_idx` (act-order), `L.outlier_idx`/`L.outlier_values`
(SpQR) when present; fp8 codes as `L.codes` (float8_e4m3fn). Every other tensor keeps its
state-dict name and is stored in the dtype of the checkpoint it came from whenever that is
lossless (a bf16 model's embeddings stay bf16), else as computed (e.g. smoothed norms in float32).
Format 1 (read only): `model.safetensors` + `quantized.safetensors` with unpacked uint8 `L.codes`.

Writers take tensors a module or a block at a time and cut shards as they go (models.shards),
so the streaming quantizer never holds the output whole. Readers (`QuantizedDir`) read headers
up front and tensors on demand; each shard's sha256 is checked the first time it is read.

Weights are rebuilt as scale * (codes - zero), the same expression the solvers used, so a
reload reproduces the in-memory fake-quant model exactly.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .atomic import write_json_atomic
from .errors import ModelError
from .models.shards import INDEX_FILE, ShardedTensors, ShardWriter, file_sha256
from .quant.actquant import attach_input_quantizers, attach_output_quantizers
from .quant.primitives import QuantizedWeight, QuantSpec, pack_bits, unpack_bits

QUANT_FILE = "quantshift.json"
REPORT_FILE = "report.json"
FORMAT_VERSION = 2
V1_FILES = ("model.safetensors", "quantized.safetensors")
# a shard is held in memory while written, and serialized once more by safetensors: small shards
# keep a save's transient memory small (the memory plan lowers this further under a tight cap)
DEFAULT_SHARD_BYTES = 512 * 2**20
# tensors stored beside each quantized linear, by suffix
QUANT_PARTS = ("qweight", "codes", "scales", "zeros", "g_idx", "outlier_idx", "outlier_values")

__all__ = [
    "FORMAT_VERSION",
    "QUANT_FILE",
    "REPORT_FILE",
    "QuantizedDir",
    "QuantizedDirWriter",
    "file_sha256",
    "is_quantized_dir",
    "load_quantized",
    "read_quant_info",
    "save_quantized",
    "staged_directory",
    "write_json_atomic",
]


def versions() -> dict[str, str]:
    import transformers

    from .version import __version__

    return {
        "quantshift": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@contextmanager
def staged_directory(out: Path, overwrite: bool, error: type[Exception] = ModelError) -> Iterator[Path]:
    """A temp dir beside `out`, renamed into place when the block succeeds, so a crash never
    leaves a half-written `out`; refuses a non-empty `out` unless `overwrite`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise error(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


StoredDtype = Callable[[str], "torch.dtype | None"]


def quantized_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The format-2 tensors of one quantized linear (see the module doc)."""
    spec = qw.spec
    out: dict[str, torch.Tensor] = {}
    if spec.dtype == "int":
        out[f"{name}.qweight"] = pack_bits(qw.codes.cpu(), spec.bits)
    else:
        out[f"{name}.codes"] = qw.codes.cpu()
    out[f"{name}.scales"] = qw.scale.float().cpu()
    zero = qw.zero.float().cpu()
    integral = bool(((zero == zero.round()) & (zero >= 0) & (zero <= 255)).all())
    out[f"{name}.zeros"] = zero.to(torch.uint8) if integral and spec.dtype == "int" else zero
    if qw.g_idx is not None:
        out[f"{name}.g_idx"] = qw.g_idx.to(torch.int32).cpu()
    for extra in ("outlier_idx", "outlier_values"):  # sparse 16-bit outliers (SpQR)
        if getattr(qw, extra, None) is not None:
            out[f"{name}.{extra}"] = getattr(qw, extra).cpu()
    return {k: v.contiguous() for k, v in out.items()}


def narrowed(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in `dtype` when that loses nothing (e.g. float32 values that came from bf16), else `t`."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    small = t.to(dtype)
    return small if torch.equal(small.to(t.dtype), t) else t


def module_entry(m: Any) -> dict[str, Any]:
    """quantshift.json's record of one module the engine changed (quant.engine.QuantizedModule)."""
    entry: dict[str, Any] = {"stage": m.stage, "info": m.info}
    spec = m.weight_spec
    if spec is not None:
        entry["weight"] = spec.model_dump()
        if m.shape is not None:
            entry["shape"] = list(m.shape)
    if m.act is not None:
        entry["act"] = m.act
    if getattr(m, "out", None) is not None:
        entry["out"] = m.out
    return entry


class QuantizedDirWriter:
    """Writes the tensors of a quantized model directory (format 2) into `out` as they come:
    float tensors by `add_float`, a quantized linear's codes and qparams by `add_quantized`,
    a whole module by `add_module`; `finish` closes the shards and writes quantshift.json.
    `stored_dtype(name)`: the dtype the source checkpoint stored a tensor in (None: unknown)."""

    def __init__(
        self, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, stored_dtype: StoredDtype | None = None
    ) -> None:
        self.out = Path(out)
        self.shards = ShardWriter(self.out, max_shard_bytes)
        self.stored_dtype = stored_dtype or (lambda _name: None)
        self.entries: dict[str, dict[str, Any]] = {}

    def add_float(self, name: str, t: torch.Tensor) -> None:
        self.shards.add(name, narrowed(t.detach(), self.stored_dtype(name)))

    def add_quantized(self, name: str, m: Any) -> None:
        """A linear's record (quant.engine.QuantizedModule); its codes are written when it has them."""
        if m.qweight is not None:
            self.shards.add_all(quantized_tensors(name, m.qweight).items())
        self.entries[name] = module_entry(m)

    def add_module(self, module: nn.Module, prefix: str, records: dict[str, Any], skip: set[str] | None = None) -> None:
        """Every state tensor of `module` (names `prefix` + its own), a quantized linear's weight
        replaced by its codes; `records`: full module name -> QuantizedModule for those it changed;
        `skip`: full tensor names already written (tied weights)."""
        coded = {f"{n}.weight" for n, m in records.items() if m.qweight is not None}
        done: set[str] = set()
        for key, t in module.state_dict(prefix=prefix, keep_vars=True).items():
            if skip is not None and key in skip:
                continue
            owner = key.rsplit(".", 1)[0]
            if key in coded:
                if owner not in done:
                    self.add_quantized(owner, records[owner])
                    done.add(owner)
                continue
            self.add_float(key, t)
        for name, m in records.items():  # records without codes (input quantizers, transforms)
            if name.startswith(prefix) and name not in done:
                self.entries[name] = module_entry(m)

    def finish(
        self,
        *,
        config: Any,
        tokenizer: Any,
        base_model: str,
        recipe: dict,
        calibration: dict | None,
        report: dict,
        dtype: str,
    ) -> None:
        digests = self.shards.close()
        config.save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)
        info = {
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "recipe": recipe,
            "calibration": calibration,
            "modules": dict(sorted(self.entries.items())),
            "input_quantizers": {n: e["act"] for n, e in sorted(self.entries.items()) if "act" in e},
            "output_quantizers": {n: e["out"] for n, e in sorted(self.entries.items()) if "out" in e},
            "dtype": dtype,
            "codes": "bitstream-le",
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "index": INDEX_FILE,
            "files": digests,
        }
        write_json_atomic(self.out / QUANT_FILE, info)
        write_json_atomic(self.out / REPORT_FILE, report)


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    *,
    base_model: str,
    recipe: dict,
    calibration: dict | None,
    modules: dict,
    report: dict,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    stored_dtype: StoredDtype | None = None,
) -> Path:
    """Write a quantized model held in memory as a directory, atomically (a temp dir renamed
    into place); tensors go to the shards in state-dict order, one at a time."""
    out = Path(out)
    with staged_directory(out, overwrite) as tmp:
        writer = QuantizedDirWriter(tmp, max_shard_bytes, stored_dtype)
        seen: set[int] = set()
        tied: set[str] = set()
        for key, p in model.state_dict(keep_vars=True).items():  # tied weights are written once
            if p.data_ptr() in seen:
                tied.add(key)
            seen.add(p.data_ptr())
        writer.add_module(model, "", modules, skip=tied)
        writer.finish(
            config=model.config,
            tokenizer=tokenizer,
            base_model=base_model,
            recipe=recipe,
            calibration=calibration,
            report=report,
            dtype=_dtype_name(next(model.parameters()).dtype),
        )
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def read_quant_info(path: Path) -> dict:
    try:
        return json.loads((path / QUANT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"corrupt quantized model directory {path}: cannot read {QUANT_FILE} ({err})") from None


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


class QuantizedDir:
    """A quantized model directory (format 1 or 2), read lazily: headers and quantshift.json when
    opened (missing or truncated shards and index entries naming absent tensors fail here),
    tensors when asked for, each shard's sha256 on its first read when `verify`."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.info = read_quant_info(self.path)
        files = self.info.get("files") or {}
        if not files:
            raise ModelError(f"corrupt quantized model directory {self.path}: {QUANT_FILE} lists no files")
        self.version = int(self.info.get("format_version", 1))
        self.tensors = ShardedTensors(
            self.path, list(files), files if verify else None, what="quantized model directory"
        )
        self.specs: dict[str, QuantSpec] = {
            n: QuantSpec(**e["weight"]) for n, e in self.info["modules"].items() if "weight" in e
        }
        for name in self.specs:
            if f"{name}.qweight" not in self.tensors and f"{name}.codes" not in self.tensors:
                raise ModelError(f"corrupt quantized model directory {self.path}: no codes for {name}")
        self._parts = {f"{n}.{part}" for n in self.specs for part in QUANT_PARTS}

    # ---- what is stored
    def config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise ModelError(f"corrupt quantized model directory {self.path}: {str(err).splitlines()[0]}") from None

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise ModelError(f"corrupt quantized model directory {self.path}: {str(err).splitlines()[0]}") from None

    @property
    def acts(self) -> dict[str, dict]:
        return dict(self.info.get("input_quantizers", {}))

    def float_names(self) -> list[str]:
        """Names of the stored tensors that are not parts of a quantized linear."""
        return [n for n in self.tensors.names() if n not in self._parts]

    def shape(self, name: str) -> tuple[int, int]:
        """[out, in] of a quantized linear."""
        entry = self.info["modules"][name]
        if "shape" in entry:
            return int(entry["shape"][0]), int(entry["shape"][1])
        codes = self.tensors.info(f"{name}.codes").shape  # format 1: unpacked codes
        return int(codes[0]), int(codes[1])

    def has(self, name: str, part: str) -> bool:
        return f"{name}.{part}" in self.tensors

    def meta_weight(self, name: str) -> QuantizedWeight:
        """Codes and qparams of a stored linear as meta tensors: format, shapes, act-order g_idx."""
        spec = self.specs[name]
        out_f, in_f = self.shape(name)
        groups = tuple(self.tensors.info(f"{name}.scales").shape)
        meta = torch.device("meta")
        codes_dtype = torch.uint8 if spec.dtype == "int" else torch.float8_e4m3fn
        g_idx = torch.empty(in_f, dtype=torch.int64, device=meta) if self.has(name, "g_idx") else None
        return QuantizedWeight(
            torch.empty(out_f, in_f, dtype=codes_dtype, device=meta),
            torch.empty(groups, device=meta),
            torch.empty(groups, device=meta),
            spec,
            g_idx,
        )

    # ---- reading
    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Codes and qparams of one quantized linear (sparse outliers not applied)."""
        spec = self.specs[name]
        parts = [p for p in QUANT_PARTS if self.has(name, p)]
        got = self.tensors.read([f"{name}.{p}" for p in parts])
        if f"{name}.qweight" in got:
            out_f, in_f = self.shape(name)
            codes = unpack_bits(got[f"{name}.qweight"], spec.bits, in_f)
        else:
            codes = got[f"{name}.codes"]
        g_idx = got.get(f"{name}.g_idx")
        qw = QuantizedWeight(
            codes,
            got[f"{name}.scales"].float(),
            got[f"{name}.zeros"].float(),
            spec,
            g_idx.long() if g_idx is not None else None,
        )
        if f"{name}.outlier_idx" in got:
            qw.outlier_idx = got[f"{name}.outlier_idx"]  # type: ignore[attr-defined]
            qw.outlier_values = got[f"{name}.outlier_values"]  # type: ignore[attr-defined]
        return qw

    def dense_weight(self, name: str) -> torch.Tensor:
        """The float32 weight a fake-quant model uses: dequantized codes, sparse outliers applied."""
        return dense_weight(self.quantized_weight(name))


def dense_weight(qw: QuantizedWeight) -> torch.Tensor:
    """Dequantized float32 weight with SpQR's sparse 16-bit outliers written over their codes."""
    w = qw.dequantize(torch.float32)
    idx = getattr(qw, "outlier_idx", None)
    if idx is not None:  # flat indices of weights kept in 16-bit, overriding their codes
        w.view(-1)[idx.long()] = qw.outlier_values.float()  # type: ignore[attr-defined]
    return w


def load_quantized(path: Path, dtype: torch.dtype, device: str, verify: bool = True) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, quantshift.json) of a quantized directory as a fake-quant model in
    `dtype` on `device`, built module by module: no dense copy of the weights besides the model."""
    from .models.lazy import FakeQuantSource, empty_model, materialize_all

    qdir = QuantizedDir(path, verify)
    model = empty_model(qdir.config(), dtype)
    materialize_all(model, FakeQuantSource(qdir, model), torch.device(device))
    attach_input_quantizers(model, qdir.acts)
    attach_output_quantizers(model, qdir.info.get("output_quantizers", {}))
    return model, qdir.tokenizer(), qdir.info
