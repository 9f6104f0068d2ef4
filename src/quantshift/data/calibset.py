"""CalibSet: n windows of seqlen tokens drawn with a seed from a source's calibration part, or n
whole examples packed into windows (a study's examples mode)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ..errors import DataError
from .sources import TextSource, get_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class CalibManifest:
    source: str
    split: str
    seed: int
    n: int
    seqlen: int
    tokens: int
    tokenizer: str
    sha256: str  # of the int64 token ids, row-major
    mode: str = "windows"  # non-overlapping windows of a joined token stream
    # a union of calibration sets ("wikipedia+news"): each part's manifest, in order
    parts: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts"] = list(self.parts)
        if not self.parts:
            del d["parts"]  # single sets keep their old manifest (and cache keys)
        return d


@dataclass
class CalibSet:
    input_ids: torch.Tensor  # [n, seqlen] int64
    manifest: CalibManifest

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]


def token_stream(
    source: TextSource, split: str, tokenizer: PreTrainedTokenizerBase, add_bos: bool = False
) -> torch.Tensor:
    """The split's documents joined and tokenized once, as a 1-D int64 tensor."""
    text = source.text(split)  # type: ignore[arg-type]
    if not text.strip():
        raise DataError(f"text source {source.name!r} has no {split} text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def sample_windows(stream: torch.Tensor, n: int, seqlen: int, seed: int, bos_id: int | None, what: str) -> torch.Tensor:
    """n distinct non-overlapping windows of the stream, chosen with `seed`.

    With a BOS id, each window is BOS + (seqlen - 1) text tokens: models such as Gemma need it.
    """
    body = seqlen - 1 if bos_id is not None else seqlen
    available = stream.numel() // body
    if n > available:
        raise DataError(
            f"{what} has {stream.numel()} tokens = {available} windows of {seqlen}; "
            f"asked for {n} x {seqlen} (use fewer samples or a shorter seqlen)"
        )
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=g)[:n].sort().values
    rows = torch.stack([stream[i * body : (i + 1) * body] for i in picks.tolist()])
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.int64), rows], dim=1)
    return rows


def union_calibset(parts: list[CalibSet]) -> CalibSet:
    """The windows of several calibration sets together, e.g. a 50/50 mixture of two sources
    (each part n x seqlen). Its manifest lists the parts, so per-part statistics can be reused."""
    if len({p.input_ids.shape[1] for p in parts}) != 1:
        raise DataError("a calibration union needs parts of one seqlen")
    ids = torch.cat([p.input_ids for p in parts])
    m0 = parts[0].manifest
    manifest = CalibManifest(
        source="+".join(p.manifest.source for p in parts),
        split=m0.split,
        seed=m0.seed,
        n=ids.shape[0],
        seqlen=ids.shape[1],
        tokens=ids.numel(),
        tokenizer=m0.tokenizer,
        sha256=ids_sha256(ids),
        mode=m0.mode,
        parts=tuple(p.manifest.to_dict() for p in parts),
    )
    return CalibSet(ids, manifest)


def split_union(source_name: str) -> list[str]:
    """ "wikipedia+news" -> ["wikipedia", "news"]; a single name -> [name]."""
    parts = [p.strip() for p in source_name.split("+")]
    if any(not p for p in parts):
        raise DataError(f"calibration source {source_name!r}: empty part in a '+' union")
    return parts


def build_calibset(
    source_name: str,
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    seqlen: int,
    seed: int,
    add_bos: bool = False,
    tokenizer_name: str = "",
    data_dir: str | None = None,
) -> CalibSet:
    """n windows of seqlen tokens from a source; "a+b" = n windows from each source, together."""
    if n <= 0 or seqlen <= 1:
        raise DataError(f"calibration needs n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")
    names = split_union(source_name)
    if len(names) > 1:
        return union_calibset(
            [build_calibset(p, tokenizer, n, seqlen, seed, add_bos, tokenizer_name, data_dir) for p in names]
        )
    source = get_source(source_name, data_dir)
    stream = token_stream(source, "calib", tokenizer)
    bos = tokenizer.bos_token_id if add_bos else None
    ids = sample_windows(stream, n, seqlen, seed, bos, f"calibration part of {source_name!r}")
    manifest = CalibManifest(
        source=source_name,
        split="calib",
        seed=seed,
        n=n,
        seqlen=seqlen,
        tokens=n * seqlen,
        tokenizer=tokenizer_name or getattr(tokenizer, "name_or_path", ""),
        sha256=ids_sha256(ids),
    )
    return CalibSet(ids, manifest)


class CalibRequest(Protocol):
    """What a calibration choice tells build_study_calibset (studies.spec.CalibChoice is one)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass: union parts are copies with another source

    @property
    def source(self) -> str: ...
    @property
    def n(self) -> int: ...
    @property
    def seqlen(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def mode(self) -> str: ...  # "tokens" (windows of a token stream) | "examples"
    @property
    def order(self) -> str: ...  # examples mode: "first" | "random"
    @property
    def answers(self) -> bool: ...


class CalibModel(Protocol):
    """What build_study_calibset reads of a model (models.load.LoadedModel is one)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...
    @property
    def needs_bos(self) -> bool: ...


def build_study_calibset(
    loaded: CalibModel, model_name: str, calib: CalibRequest, data_dir: str | None = None
) -> CalibSet:
    """build_calibset's token-budget sampling (same windows, same manifest), over any study source;
    or the examples mode."""
    names = split_union(calib.source)
    if len(names) > 1:  # a union: each part exactly as it would be alone (same cache-free sampling)
        return union_calibset(
            [build_study_calibset(loaded, model_name, replace(calib, source=p), data_dir) for p in names]
        )
    source = get_source(calib.source, data_dir, calib.answers)
    bos = loaded.tokenizer.bos_token_id if loaded.needs_bos else None
    if calib.mode == "tokens":
        stream = token_stream(source, "calib", loaded.tokenizer)
        ids = sample_windows(stream, calib.n, calib.seqlen, calib.seed, bos, f"calibration part of {calib.source!r}")
        mode = "windows"
    else:
        ids = pack_examples(source.documents("calib"), loaded.tokenizer, calib)
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos), ids[:, :-1]], dim=1)
        mode = f"examples:{calib.n}:{calib.order}"
    manifest = CalibManifest(
        source=calib.source,
        split="calib",
        seed=calib.seed,
        n=ids.shape[0],
        seqlen=ids.shape[1],
        tokens=ids.numel(),
        tokenizer=model_name,
        sha256=ids_sha256(ids),
        mode=mode,
    )
    return CalibSet(ids, manifest)


def pack_examples(docs: list[str], tokenizer: PreTrainedTokenizerBase, calib: CalibRequest) -> torch.Tensor:
    """n examples (seeded or first n), each cut to seqlen tokens, joined by EOS and packed into
    windows of seqlen; the engine needs a rectangle, and packing keeps every example's tokens."""
    if len(docs) < calib.n:
        raise DataError(f"calibration source {calib.source!r} has {len(docs)} examples; asked for {calib.n}")
    if calib.order == "first":
        picks = list(range(calib.n))
    else:
        g = torch.Generator().manual_seed(calib.seed)
        picks = sorted(torch.randperm(len(docs), generator=g)[: calib.n].tolist())
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i in picks:
        ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"][: calib.seqlen]
        stream += ids + ([eos] if eos is not None else [])
    rows = max(1, len(stream) // calib.seqlen)
    width = min(calib.seqlen, len(stream))
    return torch.tensor(stream[: rows * width], dtype=torch.int64).reshape(rows, width)
