"""Perplexity with the standard protocol: one token stream, non-overlapping windows.

Text is joined (source joiner, "\\n\\n" by default) and tokenized once, cut into windows of
`seqlen` tokens (last partial window dropped); token NLL is averaged over every predicted token
and ppl = exp(mean NLL). Models that need BOS get BOS + (seqlen - 1) text tokens per window,
and the BOS position is never scored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
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
def window_nlls(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True,
                desc: str = "perplexity", compute: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """Each window's NLL summed over its predicted tokens (float64 [windows]); `compute` makes
    the context forwards run in (e.g. LoadedModel.compute: bf16 autocast). Logits are scored
    in float32 whatever the forward's precision."""
    device = next(model.parameters()).device
    out = []
    with tqdm(total=windows.numel(), desc=desc, disable=not progress, unit="tok", unit_scale=True, leave=False) as bar:
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size].to(device)
            with compute() if compute is not None else contextlib.nullcontext():
                logits = model(input_ids=ids, use_cache=False).logits
            logits = logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(dim=1)
            out.append(nll.double().cpu())
            bar.update(ids.numel())
    return torch.cat(out)


def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True,
               desc: str = "perplexity", compute: Callable[[], AbstractContextManager] | None = None) -> tuple[float, int]:
    """Sum of token NLLs over the windows and the number of predicted tokens."""
    nlls = window_nlls(model, windows, batch_size, progress, desc, compute)
    return float(nlls.sum()), windows.shape[0] * (windows.shape[1] - 1)


def perplexity(model: torch.nn.Module, tokenizer, source_name: str, seqlen: int = 512, max_windows: int | None = None,
               add_bos: bool = False, batch_size: int = 8, split: str = "heldout", progress: bool = True,
               compute: Callable[[], AbstractContextManager] | None = None) -> PerplexityResult:
    source = get_source(source_name)
    cap = source.protocol.get("max_windows") if max_windows is None else max_windows
    stream = token_stream(source, split, tokenizer)
    bos = tokenizer.bos_token_id if add_bos else None
    win = windows_of(stream, seqlen, bos, cap)
    total, count = window_nll(model, win, batch_size, progress=progress, desc=f"ppl {source_name}", compute=compute)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, win.shape[0], seqlen, source_name, split)
