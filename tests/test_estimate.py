"""`quantshift check`'s time estimate: scaled by the machine's measured rates, in the precision the
study computes in, divided over --jobs; the probe measured once per machine and thread layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SLOW = {"gemm_float32": 60.0, "score_float32": 200.0}  # a CPU without bf16 units
FAST = {"gemm_float32": 120.0, "score_float32": 400.0}
BF16 = {**FAST, "gemm_bfloat16": 450.0, "score_bfloat16": 900.0}


def estimate(monkeypatch, rates: dict, jobs: int = 1, dtype: str | None = None) -> tuple[float, str]:
    from quantshift import preview
    from quantshift.studies.spec import load_study

    monkeypatch.setattr(preview, "study_rates", lambda jobs, on_gpu, echo=None: (dict(rates), "test rates"))
    spec = load_study(ROOT / "studies" / "offline-cross-domain.yaml")
    spec.device = "cpu"
    if dtype:
        spec.models = [m.model_copy(update={"dtype": dtype}) for m in spec.models]
    lines = preview.describe_study(spec, Path("/nonexistent-cache"), None, jobs=jobs)
    line = next(x for x in lines if "estimate with" in x)
    return float(line.rsplit("(", 1)[1].split(" s)")[0]), line


def test_estimate_follows_the_measured_rates_the_precision_and_the_jobs(monkeypatch):
    slow, line = estimate(monkeypatch, SLOW)
    fast, _ = estimate(monkeypatch, FAST)
    # every term scales with 1/rate except the fixed per-work seconds: twice the rates, about half the time
    assert 0.5 < fast / slow < 0.56 and "--jobs 1" in line
    bf16, _ = estimate(monkeypatch, BF16)
    forced, _ = estimate(monkeypatch, BF16, dtype="float32")
    assert bf16 < 0.7 * fast and forced == pytest.approx(fast)  # auto takes the bf16 rate; float32 does not
    two, line2 = estimate(monkeypatch, FAST, jobs=2)
    assert two == pytest.approx(fast / 2, rel=0.01) and "--jobs 2" in line2


def test_the_probe_runs_once_per_machine_and_layout(monkeypatch, tmp_path):
    from quantshift import machine_speed

    calls = []

    def fake_measure(workers, threads):
        calls.append((workers, threads))
        return dict(FAST)

    monkeypatch.setattr(machine_speed, "measure", fake_measure)
    said: list[str] = []
    a = machine_speed.machine_speed(tmp_path, 2, 1, said.append)
    b = machine_speed.machine_speed(tmp_path, 2, 1, said.append)
    assert calls == [(2, 1)] and a == b and a["rates"] == FAST and len(said) == 1 and "once" in said[0]
    machine_speed.machine_speed(tmp_path, 1, 2)  # another thread layout is measured on its own
    assert calls == [(2, 1), (1, 2)]
    (f,) = [p for p in (tmp_path / "machine-speed").iterdir() if json.loads(p.read_text())["key"]["workers"] == 2]
    record = json.loads(f.read_text())
    record["key"]["torch"] = "0.0.1"  # a file left by another torch: measured again, not trusted
    f.write_text(json.dumps(record))
    machine_speed.machine_speed(tmp_path, 2, 1)
    assert calls[-1] == (2, 1) and len(calls) == 3


def test_the_real_probe_measures_sane_rates(tmp_path):
    """One worker, one thread, on the bundled model: rates in a plausible range for any x86 core."""
    from quantshift.machine_speed import machine_speed

    r = machine_speed(tmp_path, 1, 1)["rates"]
    assert 5 < r["gemm_float32"] < 2000 and 20 < r["score_float32"] < 20000 and 2 < r["decode_float32"] < 5000
    if "score_bfloat16" in r:
        assert r["gemm_bfloat16"] > 0 and r["score_bfloat16"] > 20


def test_a_token_costs_by_the_models_multiply_adds_head_included(tmp_path):
    """The probe model's shape costs exactly one unit; a model with fewer blocks but a far larger
    vocabulary (gemma3-270m's 262k head against smollm2's 49k) costs more per token, not less."""
    from transformers import LlamaConfig

    from quantshift.preview import model_costs, token_cost

    def write(name: str, **kw) -> str:
        d = tmp_path / name
        d.mkdir()
        LlamaConfig(**kw).save_pretrained(d)
        return str(d)

    probe = write(
        "probe", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    few_blocks_big_head = write(
        "wide", hidden_size=576, intermediate_size=1536, num_hidden_layers=18, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=262144, tie_word_embeddings=True,
    )  # fmt: skip
    assert token_cost(probe, 256) == pytest.approx(1.0)
    assert model_costs(few_blocks_big_head)[0] == 18 and token_cost(few_blocks_big_head, 256) > 1.4
    assert token_cost(probe, 2048) > 1.1 * token_cost(probe, 256)  # attention grows with the context


def test_task_tokens_are_counted_from_the_items_choices_shots_and_template():
    from quantshift.preview import CHAT_TOKENS, task_tokens

    def unit(task: str, shots: int = 0, limit: int | None = 40, chat: bool = False) -> dict:
        s = {"kind": "task", "task": task, "shots": shots, "limit": limit}
        return {**s, "chat_template": "auto"} if chat else s

    zero, gen0, length = task_tokens(unit("arithmetic_mc"), None)
    five, _, _ = task_tokens(unit("arithmetic_mc", shots=5), None)
    half, _, _ = task_tokens(unit("arithmetic_mc", limit=20), None)
    chat, _, _ = task_tokens(unit("arithmetic_mc", chat=True), None)
    assert gen0 == 0 and 5 < length < 200  # short arithmetic prompts, each choice its own request
    assert five > 4 * zero and half == pytest.approx(zero / 2, rel=0.2)
    assert chat - zero == pytest.approx(40 * 4 * CHAT_TOKENS, rel=0.3)  # per request: 4 choices an item
    # MMLU's choices (" A".." D") are one token each: lm-eval scores them all from one forward
    from quantshift.evaluation.tasks import task_data
    from quantshift.preview import text_tokens

    data = task_data("mmlu_dev")
    prompts = sum(text_tokens(data.task.preamble) + text_tokens(it["query"]) for it in data.scored(40))
    mmlu, _, _ = task_tokens(unit("mmlu_dev"), None)
    assert mmlu == pytest.approx(prompts)
    scored, generated, _ = task_tokens(unit("if_verifiable"), None)
    assert generated == 40 * 192 and scored < generated  # answers up to max_gen_toks, generated
    guess, _, _ = task_tokens(unit("no_such_task", limit=10), None)
    assert guess == 10 * 256  # unreadable offline: the per-item constant


def test_the_estimate_follows_the_recipes_stages():
    """A smoothing-only stage adds its statistics pass (not a second GPTQ), W8A8 quantizes faster
    than GPTQ but evaluates slower (fake-quantized activations), and a transform-only stage's
    default abits slow nothing down."""
    from quantshift import preview
    from quantshift.recipes import recipe_from_dict

    def est(stages: list) -> tuple[float, float]:
        work = {
            "model": {"name": "smollm2-135m", "dtype": "float32"},
            "recipe": recipe_from_dict(stages).to_dict(),
            "calib": {"source": "wikipedia", "n": 64, "seqlen": 512},
        }
        pending = [{"kind": "ppl", "settings": {"kind": "ppl", "seqlen": 512, "windows": 8}}]
        q, e = preview.work_estimate(work, pending, False, FAST)
        return q, e - preview.WORK_FIXED_S

    gptq = est([{"gptq": {"wbits": 4}}])
    stack = est([{"smoothquant": {"quantize": False}}, {"gptq": {"wbits": 4}}])
    w8a8 = est([{"smoothquant": {}}])
    smoothing = preview.TRANSFORM_ONLY_FACTOR["smoothquant"]
    assert stack[0] == pytest.approx(gptq[0] * (1 + smoothing)) and stack[1] == pytest.approx(gptq[1])
    assert w8a8[0] < gptq[0] and w8a8[1] > gptq[1]
    assert w8a8[1] == pytest.approx(gptq[1] * preview.ACT_QUANT_EVAL_FACTOR)
