"""The lm-evaluation-harness bridge: an in-memory model in, metrics with CIs and per-item scores out.

lm-eval does the scoring (log-likelihood of each choice, length-sorted batches, few-shot
sampling, generation); we only build its model wrapper around the object we already hold,
point its TaskManager at our generated task directories, and reshape what it returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .stats import bootstrap_ci

SCORE_KEYS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "em")


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


def make_lm(loaded, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    model = loaded.model
    device = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=str(device),
                add_bos_token=True if loaded.needs_bos else None)


def run(lm, task_names: list[str], *, shots: int, limit: int | None, include_paths: list[Path], offline: bool,
        seed: int, progress: bool, include_defaults: bool = True) -> dict:
    """One lm-eval call; returns its raw result dict (results, samples, configs, group_subtasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # progress=False quiets lm-eval's logging and its progress bars (tqdm writes to sys.stderr)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if offline else {}
    with _env(env), _quiet(not progress):
        # indexing lm-eval's own ~10k task files costs seconds: skip it when every task is ours
        tm = TaskManager(include_path=[str(p) for p in include_paths] or None,
                         include_defaults=include_defaults)
        return simple_evaluate(model=lm, tasks=task_names, num_fewshot=shots, limit=limit, task_manager=tm,
                               log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                               torch_random_seed=seed, fewshot_random_seed=seed, verbosity="ERROR")


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

    def init(self, *args, **kwargs):
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
