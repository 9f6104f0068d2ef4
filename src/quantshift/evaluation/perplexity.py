"""Perplexity with the standard protocol: one token stream, non-overlapping windows.

Text is joined (source joiner, "\\n\\n" by default) and tokenized once, cut into windows of
`seqlen` tokens (last partial window dropped); token NLL is averaged over every predicted token
and ppl = exp(mean NLL). Models that need BOS get BOS + (seqlen - 1) text tokens per window,
and the BOS position is never scored.

Bits per byte (and per UTF-8 character) sit next to token perplexity because token perplexity
depends on the tokenizer: two models with different vocabularies predict different units, so
only NLL per byte of the same text compares them. The byte count must be that of exactly the
text whose tokens were scored. Each token *owns* the text from the end of the previous token to
its own end (offsets of a fast tokenizer, in characters, then converted to UTF-8 bytes), so the
owned spans tile the text and a window's scored bytes are those owned by its scored tokens: all
body tokens with BOS, all but the first (which is only context) without. Whitespace a
tokenizer folds into its neighbour goes to the next token; a character split into byte-fallback
tokens goes to the token that completes it. Tokenizers without offsets (slow ones) fall back to
decoding each window's scored tokens (`text_units_method` says which was used).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.sources import get_source
from ..errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..models.load import LoadedModel


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    source: str
    split: str
    bytes: int | None = None  # UTF-8 bytes of the scored text (see the module docstring)
    chars: int | None = None
    bpb: float | None = None  # total NLL / (ln 2 x bytes)
    bpc: float | None = None  # per UTF-8 character
    text_units_method: str | None = None  # "offsets" (exact) or "decode"

    def to_dict(self) -> dict:
        return asdict(self)


def bits_per_unit(nll_nats: float, units: int) -> float:
    """Total NLL in nats -> bits per unit of text (byte or character)."""
    return nll_nats / (math.log(2) * units)


@dataclass(frozen=True)
class HeldoutWindows:
    """Perplexity windows and, per window, the UTF-8 bytes and characters its scored tokens own."""

    ids: torch.Tensor  # [windows, seqlen]
    bytes: list[int]
    chars: list[int]
    method: str  # "offsets" | "decode"


def _utf8_prefix(text: str) -> np.ndarray:
    """prefix[c] = UTF-8 bytes of text[:c] (length len(text) + 1)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def token_ends(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """Token ids of `text` (no special tokens) and, per token, the end of the text it owns in
    characters and in UTF-8 bytes (non-decreasing); None when the tokenizer has no offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    offsets = enc.get("offset_mapping")
    if offsets is None:
        return None
    ends = np.maximum.accumulate(np.asarray([e for _s, e in offsets] or [0], dtype=np.int64))[: len(offsets)]
    return list(enc["input_ids"]), ends, _utf8_prefix(text)[ends]


def window_units(ends: np.ndarray, n_windows: int, seqlen: int, has_bos: bool) -> list[int]:
    """Text units (bytes or characters, by `ends`) owned by the scored tokens of each window of
    windows_of(): stream tokens [a, b) with a = first scored token, owned span (end[a-1], end[b-1]]."""
    body = seqlen - 1 if has_bos else seqlen
    out = []
    for w in range(n_windows):
        a, b = w * body + (0 if has_bos else 1), (w + 1) * body
        out.append(int(ends[b - 1] - (ends[a - 1] if a > 0 else 0)))
    return out


def heldout_windows(
    text: str, tokenizer: PreTrainedTokenizerBase, seqlen: int, bos_id: int | None, max_windows: int | None
) -> HeldoutWindows:
    """windows_of() over the tokenized text, with each window's scored bytes and characters."""
    got = token_ends(text, tokenizer)
    if got is not None:
        ids, char_ends, byte_ends = got
        win = windows_of(torch.tensor(ids, dtype=torch.int64), seqlen, bos_id, max_windows)
        has_bos = bos_id is not None
        return HeldoutWindows(
            win,
            window_units(byte_ends, win.shape[0], seqlen, has_bos),
            window_units(char_ends, win.shape[0], seqlen, has_bos),
            "offsets",
        )
    stream = torch.tensor(
        tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"], dtype=torch.int64
    )
    win = windows_of(stream, seqlen, bos_id, max_windows)
    scored = win[:, 1:]  # with or without BOS, position 0 is never scored
    # a 1-D sequence of ids decodes to one string
    texts = [cast(str, tokenizer.decode(row.tolist(), clean_up_tokenization_spaces=False)) for row in scored]
    return HeldoutWindows(win, [len(t.encode("utf-8")) for t in texts], [len(t) for t in texts], "decode")


def windows_of(stream: torch.Tensor, seqlen: int, bos_id: int | None, max_windows: int | None) -> torch.Tensor:
    body = seqlen - 1 if bos_id is not None else seqlen
    n = stream.numel() // body
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    rows = stream[: n * body].reshape(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=rows.dtype), rows], dim=1)
    return rows


@torch.no_grad()
def window_nlls(
    model: torch.nn.Module | LoadedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
    compute: Callable[[], AbstractContextManager] | None = None,
    max_windows_per_pass: int | None = None,
) -> torch.Tensor:
    """Each window's NLL summed over its predicted tokens (float64 [windows]).

    `model`: a torch module, or a LoadedModel (its compute precision then applies, and a model
    whose weights stay on disk is evaluated block-streamed: evaluation.streaming). `compute`
    makes the context forwards run in (e.g. LoadedModel.compute: bf16 autocast). Models of the
    families evaluation.scoring knows are scored from their final hidden states a vocabulary
    slice at a time; others from full logits, in float32 whatever the forward's precision."""
    if hasattr(model, "tokenizer") and hasattr(model, "model"):  # a LoadedModel
        loaded = cast("LoadedModel", model)
        compute = compute or loaded.compute
        if loaded.source is not None:
            from .streaming import streamed_window_nlls

            return streamed_window_nlls(loaded, windows, batch_size, progress, desc, max_windows_per_pass)
        model = loaded.model
    module = cast(torch.nn.Module, model)  # a LoadedModel is unwrapped above
    from .scoring import batch_nlls, head_in_memory

    head = head_in_memory(module)
    device = next(module.parameters()).device
    out = []
    with tqdm(total=windows.numel(), desc=desc, disable=not progress, unit="tok", unit_scale=True, leave=False) as bar:
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s : s + batch_size].to(device)
            if head is not None:
                from ..models.arch import arch_for

                with compute() if compute is not None else contextlib.nullcontext():
                    hidden = arch_for(module).backbone(module)(input_ids=ids, use_cache=False).last_hidden_state
                out.append(batch_nlls(hidden, ids, head, compute))
            else:
                with compute() if compute is not None else contextlib.nullcontext():
                    logits = module(input_ids=ids, use_cache=False).logits
                logits = logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(dim=1)
                out.append(nll.double().cpu())
            bar.update(ids.numel())
    return torch.cat(out)


def window_nll(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
    compute: Callable[[], AbstractContextManager] | None = None,
) -> tuple[float, int]:
    """Sum of token NLLs over the windows and the number of predicted tokens."""
    nlls = window_nlls(model, windows, batch_size, progress, desc, compute)
    return float(nlls.sum()), windows.shape[0] * (windows.shape[1] - 1)


def perplexity(
    model: torch.nn.Module | LoadedModel,
    tokenizer: PreTrainedTokenizerBase,
    source_name: str,
    seqlen: int = 512,
    max_windows: int | None = None,
    add_bos: bool = False,
    batch_size: int = 8,
    split: str = "heldout",
    progress: bool = True,
    compute: Callable[[], AbstractContextManager] | None = None,
    max_windows_per_pass: int | None = None,
) -> PerplexityResult:
    source = get_source(source_name)
    cap = source.protocol.get("max_windows") if max_windows is None else max_windows
    text = source.text(split)  # type: ignore[arg-type]
    if not text.strip():
        raise DataError(f"text source {source.name!r} has no {split} text")
    bos = tokenizer.bos_token_id if add_bos else None
    hw = heldout_windows(text, tokenizer, seqlen, bos, cap)
    nlls = window_nlls(model, hw.ids, batch_size, progress, f"ppl {source_name}", compute, max_windows_per_pass)
    total, count = float(nlls.sum()), hw.ids.shape[0] * (hw.ids.shape[1] - 1)
    nll = total / count
    n_bytes, n_chars = sum(hw.bytes), sum(hw.chars)
    return PerplexityResult(
        math.exp(nll),
        nll,
        count,
        hw.ids.shape[0],
        seqlen,
        source_name,
        split,
        n_bytes,
        n_chars,
        bits_per_unit(total, n_bytes),
        bits_per_unit(total, n_chars),
        hw.method,
    )
