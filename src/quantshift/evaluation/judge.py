"""MT-Bench-style dialogue evaluation: the model answers multi-turn questions, a judge grades them.

As in Zheng et al. (arXiv 2306.05685), single-answer grading: every turn's answer is rated 1-10
by a judge model that sees the conversation so far (and the reference answer, for questions that
carry one: math, reasoning, coding). quantshift ships neither the questions nor a judge:

- questions: a JSONL file in MT-Bench's layout, one question per line:
  {"question_id": 81, "category": "writing", "turns": ["...", "..."], "reference": ["..."]?}
  (FastChat's `fastchat/llm_judge/data/mt_bench/question.jsonl` is exactly this);
- judge: `hf:<hub id or local dir>`, a causal LM loaded like any model here and run greedily
  (MT-Bench used GPT-4; a small local judge is cheap but much noisier), or
  `openai:<model>@<base url>`, any OpenAI-compatible chat endpoint (vLLM, a hosted API), with the
  key in $OPENAI_API_KEY.

A judgement without a parsable "[[N]]" rating is counted as unparsed, never guessed.
The metric lands in the usual map as "task:mt_bench@0": {score, score_ci, score_turn1,
score_turn2, n, rated, unparsed, judge, ...}; samples hold every answer and judgement.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ..errors import ConfigError, DataError
from .stats import bootstrap_ci

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..models.load import LoadedModel

METRIC_KEY = "task:mt_bench@0"
Judge = Callable[[str], str]  # judge prompt -> judgement text

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


@dataclass(frozen=True)
class Question:
    qid: str
    category: str
    turns: list[str]
    reference: list[str] | None = None


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """Questions from an MT-Bench-layout JSONL file; a bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"MT-Bench questions file {p} does not exist (one JSON object per line with question_id, category, turns)"
        )
    out: list[Question] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            turns = rec["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError("'turns' must be a non-empty list of strings")
            ref = rec.get("reference")
            out.append(
                Question(
                    str(rec["question_id"]), str(rec.get("category", "")), turns, [str(r) for r in ref] if ref else None
                )
            )
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{p}:{n}: not an MT-Bench question ({err})") from None
    if not out:
        raise DataError(f"{p} holds no questions")
    return out[:limit] if limit else out


def parse_rating(judgement: str) -> float | None:
    """The last "[[N]]" with 1 <= N <= 10 in a judgement, else None."""
    found = [float(m) for m in _RATING.findall(judgement)]
    found = [r for r in found if 1.0 <= r <= 10.0]
    return found[-1] if found else None


def judge_prompt(q: Question, answers: list[str], turn: int) -> str:
    """What the judge reads when grading answer `turn` (0-based) of a conversation."""
    lines = [
        "You are grading an AI assistant's reply in a conversation. Judge helpfulness, relevance,",
        "accuracy, depth and clarity of the LAST assistant reply only.",
        "Explain briefly, then give the rating from 1 to 10 in exactly this form: [[rating]], e.g. [[6]].",
        "",
    ]
    if q.reference and turn < len(q.reference) and q.reference[turn]:
        lines += ["A correct reference answer for the last question:", q.reference[turn], ""]
    for t in range(turn + 1):
        lines += [f"User: {q.turns[t]}", f"Assistant: {answers[t]}", ""]
    return "\n".join(lines).rstrip() + "\n"


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The model's own chat template when it has one, else plain "User:/Assistant:" turns."""
    if getattr(tokenizer, "chat_template", None):
        # tokenize=False: the rendered text
        return cast(str, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    body = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages)
    return body + "Assistant:"


@torch.no_grad()
def generate(loaded: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of a prompt (special tokens already in the text)."""
    tok = loaded.tokenizer
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if loaded.needs_bos and bos is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != bos):
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)  # e.g. Gemma without a chat template
    device = (
        loaded.device if getattr(loaded, "dispatched", None) is not None else next(loaded.model.parameters()).device
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    generate_ids: Any = getattr(loaded.model, "generate")  # noqa: B009 (typed as a Tensor by nn.Module)
    out = generate_ids(
        ids.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        attention_mask=torch.ones_like(ids).to(device),
    )
    return cast(str, tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()  # one sequence: one string


def answer(loaded: LoadedModel, q: Question, max_new_tokens: int) -> list[str]:
    """The model's answer to each turn, every turn seeing the earlier ones and its own replies."""
    messages: list[dict] = []
    answers: list[str] = []
    for turn in q.turns:
        messages.append({"role": "user", "content": turn})
        reply = generate(loaded, chat_prompt(loaded.tokenizer, messages), max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        answers.append(reply)
    return answers


def hf_judge(model: str, device: str = "auto", max_new_tokens: int = 256) -> Judge:
    from ..models.load import load_model

    judge_model = load_model(model, device=device)

    def run(prompt: str) -> str:
        return generate(
            judge_model, chat_prompt(judge_model.tokenizer, [{"role": "user", "content": prompt}]), max_new_tokens
        )

    return run


def openai_judge(model: str, base_url: str, timeout: float = 120.0) -> Judge:
    key = os.environ.get("OPENAI_API_KEY", "")

    def run(prompt: str) -> str:
        body = json.dumps(
            {"model": model, "temperature": 0, "max_tokens": 512, "messages": [{"role": "user", "content": prompt}]}
        ).encode()
        req = urllib.request.Request(
            base_url.rstrip("/") + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, KeyError, json.JSONDecodeError, TimeoutError) as err:
            raise DataError(f"judge endpoint {base_url} failed: {err}") from None

    return run


def check_judge_spec(spec: str) -> None:
    """Fail on a malformed --judge before anything loads."""
    if spec.startswith("hf:") and len(spec) > 3:
        return
    if spec.startswith("openai:") and "@" in spec[7:] and all(spec[7:].split("@", 1)):
        return
    raise ConfigError(f"--judge {spec!r}: use hf:<hub id or local model dir> or openai:<model>@<base url>")


def make_judge(spec: str, device: str = "auto") -> Judge:
    check_judge_spec(spec)
    if spec.startswith("hf:"):
        return hf_judge(spec[3:], device)
    model, url = spec[7:].split("@", 1)
    return openai_judge(model, url)


def mt_bench(
    loaded: LoadedModel,
    questions: list[Question],
    judge: Judge,
    judge_name: str,
    max_new_tokens: int = 256,
    progress: bool = True,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """Answer every question, grade every turn; -> (metric, samples)."""
    from tqdm.auto import tqdm

    samples: list[dict] = []
    for q in tqdm(questions, desc="mt-bench", disable=not progress):
        answers = answer(loaded, q, max_new_tokens)
        for t in range(len(q.turns)):
            judgement = judge(judge_prompt(q, answers, t))
            samples.append(
                {
                    "id": f"{q.qid}#t{t + 1}",
                    "category": q.category,
                    "turn": t + 1,
                    "score": parse_rating(judgement),
                    "answer": answers[t],
                    "judgement": judgement,
                }
            )
    rated = [s["score"] for s in samples if s["score"] is not None]
    metric: dict = {
        "n": len(questions),
        "turns": len(samples),
        "rated": len(rated),
        "unparsed": len(samples) - len(rated),
        "judge": judge_name,
        "max_new_tokens": max_new_tokens,
        "shots": 0,
        "source": "quantshift",
    }
    metric["score"] = sum(rated) / len(rated) if rated else None
    metric["score_ci"] = list(bootstrap_ci(rated, seed=seed)) if rated else None
    for t in (1, 2):
        vals = [s["score"] for s in samples if s["turn"] == t and s["score"] is not None]
        metric[f"score_turn{t}"] = sum(vals) / len(vals) if vals else None
    return metric, samples
