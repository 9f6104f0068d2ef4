"""CalibSet: n windows of seqlen tokens drawn with a seed from a source's calibration part."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from ..errors import DataError
from .sources import TextSource, get_source


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


def token_stream(source: TextSource, split: str, tokenizer, add_bos: bool = False) -> torch.Tensor:
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
    rows = torch.stack([stream[i * body:(i + 1) * body] for i in picks.tolist()])
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
        source="+".join(p.manifest.source for p in parts), split=m0.split, seed=m0.seed, n=ids.shape[0],
        seqlen=ids.shape[1], tokens=ids.numel(), tokenizer=m0.tokenizer, sha256=ids_sha256(ids), mode=m0.mode,
        parts=tuple(p.manifest.to_dict() for p in parts))
    return CalibSet(ids, manifest)


def split_union(source_name: str) -> list[str]:
    """"wikipedia+news" -> ["wikipedia", "news"]; a single name -> [name]."""
    parts = [p.strip() for p in source_name.split("+")]
    if any(not p for p in parts):
        raise DataError(f"calibration source {source_name!r}: empty part in a '+' union")
    return parts


def build_calibset(source_name: str, tokenizer, n: int, seqlen: int, seed: int, add_bos: bool = False,
                   tokenizer_name: str = "", data_dir: str | None = None) -> CalibSet:
    """n windows of seqlen tokens from a source; "a+b" = n windows from each source, together."""
    if n <= 0 or seqlen <= 1:
        raise DataError(f"calibration needs n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")
    names = split_union(source_name)
    if len(names) > 1:
        return union_calibset([build_calibset(p, tokenizer, n, seqlen, seed, add_bos, tokenizer_name, data_dir)
                               for p in names])
    source = get_source(source_name, data_dir)
    stream = token_stream(source, "calib", tokenizer)
    bos = tokenizer.bos_token_id if add_bos else None
    ids = sample_windows(stream, n, seqlen, seed, bos, f"calibration part of {source_name!r}")
    manifest = CalibManifest(
        source=source_name, split="calib", seed=seed, n=n, seqlen=seqlen, tokens=n * seqlen,
        tokenizer=tokenizer_name or getattr(tokenizer, "name_or_path", ""), sha256=ids_sha256(ids),
    )
    return CalibSet(ids, manifest)
