"""Our log-likelihood scorer (vocabulary projection only at scored positions) against lm-eval's own."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import VOCAB, loaded_tiny

from quantshift.evaluation import harness


def _requests(seed: int, max_length: int) -> list:
    """Multiple-choice-like requests: shared contexts with one-token answers (one forward for all of
    them), multi-token answers, a context longer than the model's window (left truncation), and
    rolling-perplexity-style windows (no request string)."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    reqs = []
    for q in range(6):
        ctx = toks(rng.randrange(3, 40))
        for a in range(4):
            cont = toks(1) if q % 2 == 0 else toks(rng.randrange(1, 6))
            reqs.append(((f"q{q}", f"a{a}"), ctx, cont))
    reqs.append((("long", "x"), toks(max_length + 20), toks(3)))
    reqs.append((None, [1], toks(30)))
    return reqs


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_scored_positions_match_lm_eval(kind):
    from lm_eval.models.huggingface import HFLM

    loaded = loaded_tiny(kind)
    ours = harness.make_lm(loaded, batch_size=3)
    ours._max_length = 64
    theirs = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=3, device="cpu", max_length=64)
    reqs = _requests(0, 64)
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    want = HFLM._loglikelihood_tokens(theirs, reqs, disable_tqdm=True)
    assert len(got) == len(want) == len(reqs)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want, strict=True):
        assert lp == pytest.approx(lp_ref, abs=1e-4, rel=1e-5)
        assert greedy == greedy_ref
    # answers that are the model's own greedy tokens are flagged as such
    ctx = [5, 9, 11]
    with torch.no_grad():
        nxt = int(loaded.model(torch.tensor([ctx])).logits[0, -1].argmax())
    [(_, greedy)] = ours._loglikelihood_tokens([(("c", "g"), ctx, [nxt])], disable_tqdm=True)
    assert greedy


def test_scorer_projects_only_scored_positions():
    """The point of the scorer: the output projection sees one row per scored token, not every position."""
    loaded = loaded_tiny("llama")
    lm = harness.make_lm(loaded, batch_size=8)
    rows = []
    head = loaded.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    try:
        ctx = list(range(3, 43))
        lm._loglikelihood_tokens(
            [(("q", str(a)), ctx, [3 + a]) for a in range(4)] + [(("q", "long"), ctx, [7, 8, 9])], disable_tqdm=True
        )
    finally:
        hook.remove()
    # one forward for the four one-token answers (same input: 1 row), one for the 3-token answer (3 rows)
    assert sum(rows) == 1 + 3


def test_task_forwards_keep_the_models_bf16_autocast():
    """Under a float32+bf16-autocast precision, task scoring and generation run their matrix products
    in bf16: lm-eval's own autocast(enabled=False) around each forward must not switch it off (it did,
    and every task under `--dtype auto` on a bf16 CPU was computed in float32)."""
    from dataclasses import replace

    from quantshift.models.precision import Precision

    loaded = replace(loaded_tiny("llama"), precision=Precision(torch.float32, torch.bfloat16))
    lm = harness.make_lm(loaded, batch_size=4)
    seen = []
    layer = loaded.model.model.layers[0].mlp.down_proj
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with loaded.compute():  # as evaluation.run.evaluate calls the harness
            lm._loglikelihood_tokens([(("q", "a"), [5, 9, 11], [7])], disable_tqdm=True)
            lm._model_generate(torch.tensor([[5, 9, 11]]), max_length=6, stop=[], do_sample=False)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
