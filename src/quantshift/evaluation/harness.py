"""The lm-evaluation-harness bridge: an in-memory model in, metrics with CIs and per-item scores out.

lm-eval does the scoring (log-likelihood of each choice, length-sorted batches, few-shot
sampling, generation); we only build its model wrapper around the object we already hold,
point its TaskManager at our generated task directories, and reshape what it returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stats import bootstrap_ci

if TYPE_CHECKING:
    import torch.nn as nn
    from lm_eval.models.huggingface import HFLM

    from ..models.load import LoadedModel

SCORE_KEYS = ("acc", "acc_norm", "inst_acc", "exact_match", "f1", "mcc", "em")


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a call only (never at import)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Identifies how log-likelihoods are computed; part of a task result's cache key (a change in
# batching or in where the vocabulary projection runs can move bf16 results in the last digits).
# 2: under bf16 autocast, task forwards and generations really run in bf16 (before, lm-eval's own
# autocast(enabled=False) turned it off: those results were float32 computations).
SCORER = "scored-positions-2"

# one log-likelihood request as lm-eval's causal scorer gets it: (cache key (context, continuation)
# or None, context token ids, continuation token ids)
Request = tuple[tuple[str, str] | None, list[int], list[int]]


def make_lm(loaded: LoadedModel, batch_size: int) -> HFLM:
    import torch
    from lm_eval.models.huggingface import HFLM

    class ScoredPositionsLM(HFLM):
        """lm-eval's HF wrapper, scoring log-likelihoods with the vocabulary projection only where a
        continuation token is scored. lm-eval projects every position of every input onto the
        vocabulary and log-softmaxes it all; with Gemma's 262k vocabulary that is most of the
        compute (in gemma3-270m the projection has ~1.7x the multiply-adds of all its blocks)."""

        def _loglikelihood_tokens(
            self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
        ) -> list[tuple[float, bool]]:
            if self.backend != "causal" or not _accepts_logits_to_keep(self.model):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            return score_continuations(
                self, requests, batch_size=int(override_bs or self.batch_size), progress=not disable_tqdm
            )

    model = loaded.model
    # a dispatched model's parameters may sit on meta between forwards: inputs go to its compute device
    device = loaded.device if loaded.dispatched is not None else next(model.parameters()).device
    lm = ScoredPositionsLM(
        pretrained=model,
        tokenizer=loaded.tokenizer,
        batch_size=batch_size,
        device=str(device),
        add_bos_token=True if loaded.needs_bos else None,
        # lm-eval wraps every forward and generate in autocast(enabled=mixed_precision_dtype is not
        # None): left None, that switches off the caller's bf16 autocast and tasks run in float32
        mixed_precision_dtype=loaded.precision.autocast,
    )
    lm._device = torch.device(device)  # lm-eval takes a given model's device from its first parameter
    return lm


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def score_continuations(
    lm: HFLM, requests: Sequence[Request], *, batch_size: int, progress: bool
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy choice) per request.

    The same contract as lm-eval's causal scorer: input = (context + continuation)[-(max_length+1):][:-1],
    the continuation's tokens scored at the input's last len(continuation) positions. Requests with
    the same input (multiple choice with one-token answers) share one forward; inputs run longest
    first, right-padded (a causal model's earlier positions never see the padding), and only the
    scored positions are projected onto the vocabulary (transformers' boolean `logits_to_keep`).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    max_len = lm.max_length
    by_input: dict[tuple[int, ...], list[int]] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(cont) > max_len:
            raise ValueError(
                f"cannot score request {i}: context {len(ctx)} tokens, continuation {len(cont)} "
                f"(the model's maximum is {max_len})"
            )
        by_input.setdefault(tuple((ctx + cont)[-(max_len + 1) :][:-1]), []).append(i)
    inputs = sorted(by_input, key=lambda t: (-len(t), t))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    softmax_dtype = lm.softmax_dtype or torch.float32
    bar = tqdm(total=len(requests), disable=not progress, desc="Running loglikelihood requests")
    for start in range(0, len(inputs), max(1, batch_size)):
        batch = inputs[start : start + max(1, batch_size)]
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        keep = torch.zeros(len(batch), width, dtype=torch.bool)
        n_keep = []
        for row, inp in enumerate(batch):
            k = max(len(requests[i][2]) for i in by_input[inp])
            ids[row, : len(inp)] = torch.tensor(inp)
            keep[row, len(inp) - k : len(inp)] = True
            n_keep.append(k)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=lm.device.type, dtype=lm.mixed_precision_dtype, enabled=lm.mixed_precision_dtype is not None
            ),
        ):
            logits = lm.model(ids.to(lm.device), logits_to_keep=keep.to(lm.device)).logits
        logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1, dtype=softmax_dtype)
        for inp, rows in zip(batch, torch.split(logp, n_keep), strict=True):
            greedy = rows.argmax(dim=-1)
            for i in by_input[inp]:
                key, _, cont = requests[i]
                target = torch.tensor(cont, device=rows.device)
                tail = rows[len(rows) - len(cont) :]
                answer = (
                    float(tail.gather(1, target[:, None]).sum()),
                    bool((greedy[len(rows) - len(cont) :] == target).all()),
                )
                out[i] = answer
                if key is not None:  # lm-eval's rolling perplexity passes None: it caches per document
                    lm.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


def run(
    lm: HFLM,
    task_names: list[str],
    *,
    shots: int,
    limit: int | None,
    include_paths: list[Path],
    offline: bool,
    seed: int,
    progress: bool,
    include_defaults: bool = True,
    chat: bool = False,
) -> dict:
    """One lm-eval call; returns its raw result dict (results, samples, configs, group_subtasks).
    `chat`: prompts rendered by the tokenizer's chat template (lm-eval's apply_chat_template),
    few-shot examples as earlier user/assistant turns (fewshot_as_multiturn)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # progress=False quiets lm-eval's logging and its progress bars (tqdm writes to sys.stderr)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if offline else {}
    with _env(env), _quiet(not progress):
        # indexing lm-eval's own ~10k task files costs seconds: skip it when every task is ours
        tm = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=include_defaults)
        return simple_evaluate(
            model=lm,
            tasks=task_names,
            num_fewshot=shots,
            limit=limit,
            task_manager=tm,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="ERROR",
            apply_chat_template=chat,
            fewshot_as_multiturn=chat and shots > 0,
        )


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    lg = logging.getLogger("lm_eval")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with _no_progress_bars():
            yield
    finally:
        lg.setLevel(old)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Every tqdm bar created inside is disabled: lm-eval (and `datasets`) have no switch for
    theirs. Patching tqdm's constructor, not redirecting stderr, keeps warnings and the logging
    handlers that lm-eval creates meanwhile pointing at the real stderr."""
    import tqdm.std

    original = tqdm.std.tqdm.__dict__["__init__"]

    def init(self: tqdm.std.tqdm, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        return original.__get__(self, type(self))(*args, **kwargs)

    tqdm.std.tqdm.__init__ = init
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original


def convert_samples(raw: list[dict]) -> list[dict]:
    """lm-eval's logged samples -> [{"id", <metric>: score, "pred", "gold", "lls"?}] in doc order."""
    out = []
    for s in sorted(raw, key=lambda s: s["doc_id"]):
        doc = s.get("doc") or {}
        rec: dict = {"id": str(doc.get("id", s["doc_id"]))}
        for m in s.get("metrics", []):
            v = s.get(m)
            rec[m] = float(v) if isinstance(v, (int, float, bool)) else v
        resps = s.get("filtered_resps") or []
        if resps and isinstance(resps[0], (tuple, list)) and len(resps[0]) == 2 and isinstance(resps[0][0], float):
            lls = [float(r[0]) for r in resps]
            rec["lls"] = lls
            rec["pred"] = max(range(len(lls)), key=lls.__getitem__)
        elif resps:
            rec["pred"] = resps[0] if isinstance(resps[0], str) else str(resps[0])
        tgt = s.get("target")
        rec["gold"] = tgt if isinstance(tgt, (int, str)) else str(tgt)
        out.append(rec)
    return out


def summarize(samples: list[dict], reported: dict | None = None, seed: int = 0) -> dict:
    """Metric means (lm-eval's own where it reported them) with 95% bootstrap CIs from the items."""
    out: dict = {"n": len(samples)}
    for m in SCORE_KEYS:
        vals = [s[m] for s in samples if isinstance(s.get(m), (int, float))]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        if reported and isinstance(reported.get(f"{m},none"), (int, float)):
            mean = float(reported[f"{m},none"])
        out[m] = mean
        out[f"{m}_ci"] = list(bootstrap_ci(vals, seed=seed))
    return out
