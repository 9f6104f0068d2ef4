"""Perplexity with the standard protocol: one token stream, non-overlapping windows.

Text is joined (source joiner, "\\n\\n" by default) and tokenized once, cut into windows of
`seqlen` tokens (last partial window dropped); token NLL is averaged over every predicted token
and ppl = exp(mean NLL). Models that need BOS get BOS + (seqlen - 1) text tokens per window,
and the BOS position is never scored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibset import token_stream
from ..data.sources import get_source
from ..errors import DataError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    source: str
    split: str

    def to_dict(self) -> dict:
        return asdict(self)


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
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Sum of token NLLs over the windows and the number of predicted tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[s:s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(nll)
        count += target.numel()
    return total, count


def perplexity(model: torch.nn.Module, tokenizer, source_name: str, seqlen: int = 512, max_windows: int | None = None,
               add_bos: bool = False, batch_size: int = 4, split: str = "heldout", progress: bool = True) -> PerplexityResult:
    source = get_source(source_name)
    cap = source.protocol.get("max_windows") if max_windows is None else max_windows
    stream = token_stream(source, split, tokenizer)
    bos = tokenizer.bos_token_id if add_bos else None
    win = windows_of(stream, seqlen, bos, cap)
    total, count = window_nll(model, win, batch_size, progress=progress, desc=f"ppl {source_name}")
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, win.shape[0], seqlen, source_name, split)
