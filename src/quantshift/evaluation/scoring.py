"""Token NLL from a model's final hidden states, a slice of the vocabulary at a time.

The output projection's logits of every position at once ([positions x vocabulary], then a
float32 copy, then log-softmax) take 10-15 GB at batch 4 x 2048 tokens with a 128k vocabulary.
Here the head's rows are read `VOCAB_CHUNK` at a time and each position keeps a running
maximum, a running sum of exponentials and its target's logit (an online log-sum-exp), so no
tensor larger than one tile of `TILE_POSITIONS` x `VOCAB_CHUNK` logits exists.

The tiles are the same in both loop orders: in memory, batch by batch and within each batch
slice by slice; streamed (the head read from disk once), slice by slice and within each slice
batch by batch. Every tile is one F.linear on the same rows in the same context, and each
position's running values are updated in the same slice order, so both orders give the same
bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.shards import return_freed_memory

# part of a perplexity result's cache key: the online log-sum-exp is closer to float64 than float32
# F.cross_entropy over the whole vocabulary was (smollm2-135m, 2 x 63 tokens: 2.3e-5 vs 3.0e-3 nats
# off in total), so results from before it differ in the fifth significant digit
PPL_SCORER = "vocab-slices-1"
VOCAB_CHUNK = 16384
TILE_POSITIONS = 1024

# model types whose logits are exactly lm_head(backbone output), softcapped when configured
CHUNKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2")


@dataclass
class Head:
    """The output projection as rows: `rows(a, b)` gives weight rows [a, b) in the dtype the
    projection computes in; `softcap`: Gemma's final logit soft-capping (None: none)."""

    rows: Callable[[int, int], torch.Tensor]
    vocab: int
    bias: torch.Tensor | None = None
    softcap: float | None = None


def softcap_of(config: object) -> float | None:
    text = getattr(config, "get_text_config", lambda: config)()
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def head_in_memory(model: nn.Module) -> Head | None:
    """The resident output projection of a supported model as a Head; None when its logits are
    not plainly lm_head(hidden) (unknown families, an int8 head): score those from full logits."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in CHUNKED_MODEL_TYPES:
        return None
    get_head: Any = getattr(model, "get_output_embeddings", None)  # typed as a Tensor by nn.Module
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear or head.weight.is_meta:
        return None
    w = head.weight
    return Head(lambda a, b: w[a:b], w.shape[0], head.bias, softcap_of(config))


class RunningNLL:
    """Online log-sum-exp over vocabulary slices for a fixed set of positions."""

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets.reshape(-1)
        n, dev = self.targets.numel(), self.targets.device
        self.max = torch.full((n,), float("-inf"), device=dev)
        self.sum = torch.zeros(n, device=dev)
        self.target_logit = torch.zeros(n, device=dev)

    def update(self, logits: torch.Tensor, start: int, positions: slice) -> None:
        """logits: float32 [positions, slice width] for vocabulary ids start.., consumed (overwritten
        in place: a tile is tens of MB, and fresh temporaries of that size cost page faults)."""
        t = self.targets[positions] - start
        inside = (t >= 0) & (t < logits.shape[1])
        picked = logits.gather(1, t.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
        self.target_logit[positions] = torch.where(inside, picked, self.target_logit[positions])
        m_old, s_old = self.max[positions], self.sum[positions]
        m_new = torch.maximum(m_old, logits.amax(dim=-1))
        s_new = s_old * torch.exp(m_old - m_new) + logits.sub_(m_new[:, None]).exp_().sum(dim=-1)
        self.max[positions], self.sum[positions] = m_new, s_new

    def nll(self) -> torch.Tensor:
        return self.max + torch.log(self.sum) - self.target_logit


def update_slice(
    state: RunningNLL,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    start: int,
    softcap: float | None,
    compute: Callable[[], AbstractContextManager] | None,
) -> None:
    """One vocabulary slice [start, start + rows) over every position of `hidden` [P, H]."""
    for p0 in range(0, hidden.shape[0], TILE_POSITIONS):
        sl = slice(p0, min(p0 + TILE_POSITIONS, hidden.shape[0]))
        with compute() if compute is not None else contextlib.nullcontext():
            logits = F.linear(hidden[sl], weight, None if bias is None else bias[start : start + weight.shape[0]])
        logits = logits.float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        state.update(logits, start, sl)


def batch_nlls(
    hidden: torch.Tensor, ids: torch.Tensor, head: Head, compute: Callable[[], AbstractContextManager] | None = None
) -> torch.Tensor:
    """Summed NLL of each window of one batch (float64 [b]) from its final hidden states
    [b, seqlen, H]: position t predicts token t + 1."""
    b, s, h = hidden.shape
    flat = hidden[:, :-1].reshape(-1, h)
    state = RunningNLL(ids[:, 1:].to(hidden.device))
    for start in range(0, head.vocab, VOCAB_CHUNK):
        w = head.rows(start, min(start + VOCAB_CHUNK, head.vocab))
        update_slice(state, flat, w, head.bias, start, head.softcap, compute)
    return state.nll().reshape(b, s - 1).sum(dim=1).double().cpu()


def batches_nlls(
    hiddens: list[torch.Tensor],
    ids: list[torch.Tensor],
    head: Head,
    compute: Callable[[], AbstractContextManager] | None = None,
) -> list[torch.Tensor]:
    """batch_nlls of several batches with each vocabulary slice read once (head streamed from
    disk): the same tiles as batch by batch, in the other loop order (see the module doc)."""
    flats = [h[:, :-1].reshape(-1, h.shape[-1]) for h in hiddens]
    states = [RunningNLL(i[:, 1:].to(h.device)) for h, i in zip(hiddens, ids, strict=True)]
    for start in range(0, head.vocab, VOCAB_CHUNK):
        w = head.rows(start, min(start + VOCAB_CHUNK, head.vocab))
        for flat, state in zip(flats, states, strict=True):
            update_slice(state, flat, w, head.bias, start, head.softcap, compute)
        del w
        return_freed_memory()  # a slice of the head read from disk
    return [
        st.nll().reshape(h.shape[0], h.shape[1] - 1).sum(dim=1).double().cpu()
        for st, h in zip(states, hiddens, strict=True)
    ]
