"""Evaluation engine: lm-eval over local task files, CIs, leakage guard, suites, output shape."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import has_real_models, loaded_tiny

from quantshift.errors import ConfigError, DataError
from quantshift.evaluation.leakage import check_leakage, find_overlaps
from quantshift.evaluation.metrics import exact_match, f1
from quantshift.evaluation.run import EvalResult, evaluate, preflight
from quantshift.evaluation.stats import bootstrap_ci, paired_bootstrap
from quantshift.evaluation.taskdef import TaskDef
from quantshift.evaluation.tasks import SUITES, TASKS, dimension_of, split_items


def _toy_items(_data_dir=None, n=30):
    return [
        {"id": f"t{i}", "query": f"Q: what follows {i}?\nA:", "choices": [str(i + 1), str(i + 7)], "gold": 0}
        for i in range(n)
    ]


TOY = TaskDef("toy_follow", "toy successor task", "toy", _toy_items)


@pytest.fixture(scope="module")
def toy_run():
    return evaluate(loaded_tiny(), tasks=[TOY], shots=(0, 2), limit=6, progress=False)


def test_loglikelihood_matches_hand_computation(toy_run):
    """lm-eval's reported choice log-likelihoods equal the sum of the model's token log-probs."""
    loaded = loaded_tiny()
    tok = loaded.tokenizer
    rows = toy_run.samples["task:toy_follow@0"]
    items = {it["id"]: it for it in _toy_items()}
    assert len(rows) == 6
    for row in rows[:3]:
        it = items[row["id"]]
        for k, choice in enumerate(it["choices"]):
            ctx = tok(it["query"], add_special_tokens=False)["input_ids"]
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
            by_hand = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            assert row["lls"][k] == pytest.approx(by_hand, abs=1e-3)
        assert row["acc"] == float(row["pred"] == it["gold"])


def test_metrics_shape_and_ci(toy_run, tmp_path):
    m = toy_run.metrics["task:toy_follow@2"]
    assert m["n"] == 6 and m["limit"] == 6 and m["shots"] == 2 and m["category"] == "toy"
    assert m["acc_ci"][0] <= m["acc"] <= m["acc_ci"][1]
    assert m["acc"] == pytest.approx(sum(r["acc"] for r in toy_run.samples["task:toy_follow@2"]) / 6)
    # the same items are scored at every shot count (paired analysis needs that): the first
    # `limit` of the task's fixed test order
    ids = [r["id"] for r in toy_run.samples["task:toy_follow@0"]]
    assert ids == [r["id"] for r in toy_run.samples["task:toy_follow@2"]]
    assert ids == [it["id"] for it in split_items(TOY, _toy_items()).scored(6)]
    out = tmp_path / "out.json"
    samples_path = toy_run.write(out, {"model": "tiny"})
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"task:toy_follow@0", "task:toy_follow@2"} and data["model"] == "tiny"
    lines = [json.loads(x) for x in samples_path.read_text().splitlines()]
    assert samples_path.name == "out.samples.jsonl" and len(lines) == 12
    assert {"key", "id", "acc", "acc_norm", "lls"} <= set(lines[0])


def test_generation_task_scores_f1_and_exact_match():
    items = lambda _d: [{"id": f"g{i}", "query": f"Q: say {i}\nA:", "answers": [str(i)]} for i in range(8)]  # noqa: E731
    t = TaskDef("toy_gen", "toy generation", "toy", items, kind="gen", max_gen_toks=3)
    r = evaluate(loaded_tiny(), tasks=[t], shots=(1,), limit=2, progress=False)
    m = r.metrics["task:toy_gen@1"]
    assert m["n"] == 2 and 0 <= m["f1"] <= 1 and "exact_match_ci" in m
    assert all(isinstance(s["pred"], str) for s in r.samples["task:toy_gen@1"])
    assert f1("the Eiffel tower", ["Eiffel Tower"]) == 1.0 and exact_match("Paris.", ["paris"]) == 1.0
    assert 0 < f1("big red dog", ["red dog house"]) < 1


def test_bootstrap_ci_contains_estimate_and_shrinks():
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(40, generator=g) < 0.7).float().tolist()
    large = (torch.rand(4000, generator=g) < 0.7).float().tolist()
    for x in (small, large):
        lo, hi = bootstrap_ci(x, seed=1)
        assert lo <= sum(x) / len(x) <= hi
    assert (bootstrap_ci(large)[1] - bootstrap_ci(large)[0]) < 0.3 * (bootstrap_ci(small)[1] - bootstrap_ci(small)[0])
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)


def test_paired_bootstrap():
    a = [1.0] * 60 + [0.0] * 40
    same = paired_bootstrap(a, a)
    assert same.diff == 0 and same.p_value == 1.0
    b = [0.0] * 30 + a[30:]  # b loses 30 items a got right
    r = paired_bootstrap(a, b, seed=0)
    assert r.diff == pytest.approx(-0.3) and r.ci[1] < 0 and r.p_value < 0.01
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:10])
    # the sign-flip p-value is exact for small n: 3 of 3 items better -> p = 2 / 2**3
    assert paired_bootstrap([0.0] * 3, [1.0] * 3).p_value == pytest.approx(0.25)


def test_leakage_guard_catches_planted_overlap():
    scored = [
        ("s1", "the quick brown fox jumps over the lazy dog near the river bank at dawn today"),
        ("s2", "a completely different sentence about quantization of language models"),
    ]
    clean = [("p1", "nothing in common here at all"), ("p2", "another unrelated exemplar text")]
    assert check_leakage(scored, clean, "pool") == []
    planted = clean + [
        ("p9", "prefix words then the quick brown fox jumps over the lazy dog near the river bank at dawn")
    ]
    with pytest.raises(DataError, match=r"s1 ~ p9 \(13-gram"):
        check_leakage(scored, planted, "the few-shot pool")
    with pytest.raises(DataError, match=r"s2 ~ s2 \(id"):
        check_leakage(scored, clean + [("s2", "x")], "pool")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_leakage(scored, planted, "calibration", strict=False)
    assert any("s1 ~ p9" in str(x.message) for x in w)
    assert len(find_overlaps(scored, planted)) == 1


def test_fewshot_guard_names_planted_exemplar():
    from quantshift.evaluation.run import _guard_fewshot
    from quantshift.evaluation.tasks import TaskData

    items = _toy_items(n=20)
    planted = {"id": "p0", "query": "Q: what follows 3?\nA:", "choices": ["4", "10"], "gold": 0}
    long_q = "Q: in the year when the old bridge over the wide river finally closed for repairs what follows 3?\nA:"
    test = [{**items[0], "query": long_q}] + items[1:10]
    data = TaskData(TOY, test, items[10:] + [{**planted, "query": "Note: " + long_q}], 0)
    with pytest.raises(DataError, match=r"few-shot pool of task toy_follow.*t0 ~ p0"):
        _guard_fewshot(data, None)
    with pytest.raises(DataError, match=r"t1 ~ t1 \(id"):
        _guard_fewshot(TaskData(TOY, items[:10], items[1:2], 0), None)


def test_split_keeps_shared_passages_on_one_side():
    passage = "the committee met on tuesday to decide the budget for the new public library in the town"
    items = [
        {"id": f"q{i}", "query": f"{passage}. Question {i}: who?\nA:", "choices": ["a", "b"], "gold": 0}
        for i in range(4)
    ]
    items += _toy_items(n=40)
    d = split_items(TaskDef("toy_shared", "x", "toy", lambda _d: items), items)
    sides = {("test" if it in d.test else "pool") for it in items if it["id"].startswith("q")}
    assert len(sides) == 1  # the four items sharing a passage are never split across sides
    assert not {it["id"] for it in d.test} & {it["id"] for it in d.pool}


def test_calibration_leakage_is_reported(tmp_path):
    loaded = loaded_tiny()
    items = _toy_items()
    # a calibration text file that contains the scored items verbatim
    calib = tmp_path / "calib.txt"
    long_items = [
        {**it, "query": f"Context: {' '.join(f'w{i}x{j}' for j in range(20))}\nQ: {i}?\nA:"}
        for i, it in enumerate(items)
    ]
    calib.write_text("\n\n".join(it["query"] for it in long_items) * 1)
    loaded.quant_info = {"calibration": {"source": str(calib), "split": "calib"}}
    t = TaskDef("toy_leaky", "x", "toy", lambda _d: [dict(x) for x in long_items])
    with pytest.warns(UserWarning, match=r"leakage: calibration source .*calib.txt.* overlaps"):
        evaluate(loaded, tasks=[t], limit=2, progress=False)


def test_missing_suite_data_names_expected_files(tmp_path):
    with pytest.raises(
        DataError, match=r"boss/ExtractiveQA/squad/train.json.*missing|missing: .*boss/ExtractiveQA/squad/train.json"
    ):
        preflight(suite="boss", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"--data-dir \(none given\)"):
        preflight(suite="ceval")
    (tmp_path / "cmmlu" / "dev").mkdir(parents=True)
    with pytest.raises(DataError, match=r"cmmlu/dev/anatomy.csv"):
        preflight(tasks=["cmmlu_stem"], data_dir=tmp_path)


def test_boss_local_files_become_tasks(tmp_path):
    root = tmp_path / "boss" / "SentimentAnalysis"
    for ds in ("amazon", "dynasent"):
        (root / ds).mkdir(parents=True)
        rows = ["text\tlabel"] + [
            f"review number {i} of {ds} was {'great' if i % 2 else 'awful'}\t{i % 2}" for i in range(20)
        ]
        for split in ("train", "test"):
            (root / ds / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    from quantshift.evaluation.tasks import materialize, task_data

    d = task_data("boss_sa_dynasent", tmp_path)
    assert d.test[0]["query"].startswith("### Input ###\nText: ")
    assert d.pool and all(it["id"].startswith("amazon/train/") for it in d.pool)  # exemplars from the ID set
    # an OOD set has no train split: its calibration items are carved out of test and not scored
    # (300 in the paper; at most half of this tiny set)
    assert len(d.calib) == 10 and len(d.test) == 10
    assert all(it["id"].startswith("dynasent/test/") for it in d.calib)
    assert not {it["id"] for it in d.calib} & {it["id"] for it in d.test}
    from quantshift.evaluation.tasks import task_source

    src = task_source("boss_sa_dynasent", str(tmp_path))
    calib_text = src.load_split("calib")
    assert len(calib_text) == 10 and all("dynasent" in t for t in calib_text)
    assert task_data("boss_sa_amazon", tmp_path).calib == task_data("boss_sa_amazon", tmp_path).pool
    name, path = materialize(d, tmp_path / "tasks")
    text = (path / f"{name}.yaml").read_text()
    assert "### Instruction ###" in text and "{{shot}}" in text


def test_suites_and_tasks_registered():
    assert {"s1", "boss", "ceval", "cmmlu", "instruct", "ppl", "offline", "instruct-offline"} <= set(SUITES.names())
    s1 = SUITES.get("s1")
    assert len(s1.tasks) == 26 and len(s1.categories) == 9 and s1.shots == (0, 5)
    boss = SUITES.get("boss")
    assert boss.shots_per_task["boss_eqa_squad"] == 1 and boss.shots_per_task["boss_td_toxigen"] == 2
    off = SUITES.get("offline")
    assert sum(t.startswith("bb_") for t in off.tasks) >= 8 and all(t in TASKS for t in off.tasks)
    assert {SUITES.get(s).category_of(t) for s in ("ceval", "cmmlu") for t in SUITES.get(s).tasks} == {
        "STEM",
        "Social Science",
        "Humanities",
        "Other",
    }


@pytest.mark.parametrize("name,min_items", [("mmlu_dev", 250), ("movie_sentiment", 200), ("zh_sentiment", 5000)])
def test_package_tasks_and_calibration_sources(name, min_items):
    from quantshift.data.sources import get_source
    from quantshift.evaluation.tasks import task_data

    d = task_data(name)
    assert len(d.test) + len(d.pool) + d.dropped >= min_items
    assert all(0 <= it["gold"] < len(it["choices"]) for it in d.test)
    src = get_source(f"task:{name}")
    calib, held = src.documents("calib"), src.documents("heldout")
    assert len(calib) == len(d.pool) and len(held) == len(d.test) and not set(calib) & set(held)
    gold_text = d.pool[0]["choices"][d.pool[0]["gold"]]
    assert calib[0].endswith(gold_text)  # calibration text carries the answers


def test_cli_list_and_errors():
    def qs(*args):
        return subprocess.run(
            [sys.executable, "-m", "quantshift.cli", *args], capture_output=True, text=True, timeout=300
        )

    r = qs("list", "suites")
    assert r.returncode == 0 and "offline" in r.stdout and "boss" in r.stdout
    r = qs("list", "tasks")
    assert r.returncode == 0 and "bb_social_iqa" in r.stdout and "lm-eval task name" in r.stdout
    r = qs("eval", "smollm2-135m", "--suite", "boss", "--data-dir", "/nonexistent")
    # a missing --data-dir is named before any task data is read (quantshift.validate)
    assert r.returncode == 2 and "--data-dir '/nonexistent' does not exist" in r.stderr and "Traceback" not in r.stderr
    r = qs("eval", "smollm2-135m", "--suite", "nosuch")
    assert r.returncode == 2 and "unknown suite 'nosuch'" in r.stderr


@pytest.mark.slow
def test_bigbench_tasks_from_pypi_sdist():
    """Downloads bigbench==1.0.0 (about 360 MB) once into the cache, then reads task.json files.
    Skipped where the package index does not serve that release (a mirror without it)."""
    from quantshift.errors import DataError
    from quantshift.evaluation.offline import bigbench_archive
    from quantshift.evaluation.tasks import task_data

    try:
        bigbench_archive()
    except DataError as err:
        if "cannot download" not in str(err):
            raise
        pytest.skip(f"BIG-bench data not obtainable here: {err}")

    names = {t for s in ("offline", "instruct-offline") for t in SUITES.get(s).tasks if t.startswith("bb_")}
    for name in sorted(names):
        d = task_data(name)
        assert len(d.test) >= (20 if name == "bb_known_unknowns" else 30) and d.pool, name
        assert all(0 <= it["gold"] < len(it["choices"]) for it in d.test)
        ids = [it["id"] for it in d.test + d.pool]
        assert len(ids) == len(set(ids)), name
    # the instruct-offline task types, each through its category to a dimension
    inst = SUITES.get("instruct-offline")
    types = {inst.category_of(t) for t in inst.tasks}
    assert types == {"commonsense_qa", "knowledge_language", "hallucination", "mathematics", "instruction_following"}
    assert {dimension_of(c) for c in types} == {"knowledge/capability", "alignment", "reasoning"}
    assert len(task_data("bb_arithmetic").test) >= 1500 and len(task_data("bb_misconceptions").test) >= 100


@pytest.mark.slow
@pytest.mark.skipif(not has_real_models(), reason="bundled model package not installed")
def test_real_model_sentiment_above_chance(tmp_path):
    out = tmp_path / "e.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantshift.cli",
            "eval",
            "smollm2-135m",
            "--tasks",
            "movie_sentiment",
            "--limit",
            "50",
            "--quiet",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(out.read_text())["metrics"]["task:movie_sentiment@0"]
    # measured 0.64 [0.52, 0.76] on these 50 items (fp, CPU); chance is 0.5
    assert m["n"] == 50 and m["acc"] > 0.58, m
    assert (tmp_path / "e.samples.jsonl").is_file()
    assert "Running loglikelihood" not in r.stderr  # --quiet silences lm-eval's progress bars too


def test_eval_result_dataclass_defaults():
    r = EvalResult()
    assert r.metrics == {} and r.samples == {}


# ---------------------------------------------------------------- MT-Bench-style judged dialogue


def _questions(tmp_path, rows):
    p = tmp_path / "question.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_judge_ratings_are_parsed_strictly():
    from quantshift.evaluation.judge import parse_rating

    assert parse_rating("Clear and correct. Rating: [[8]]") == 8.0
    assert parse_rating("first [[3]] then, on reflection, [[ 7.5 ]]") == 7.5
    assert parse_rating("I would give it 9/10") is None  # no [[N]]: unparsed, never guessed
    assert parse_rating("[[0]] or [[11]]") is None  # outside 1..10


def test_mt_bench_answers_every_turn_and_grades_it(tmp_path):
    from quantshift.evaluation.judge import judge_prompt, load_questions, mt_bench

    path = _questions(
        tmp_path,
        [
            {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now make it sad."]},
            {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "reference": ["4", "6"]},
        ],
    )
    questions = load_questions(path)
    seen: list[str] = []

    def judge(prompt: str) -> str:  # a stand-in judge: rates first turns, fails to rate second turns
        seen.append(prompt)
        return "Good. [[7]]" if prompt.count("User: ") == 1 else "no rating given"

    metric, samples = mt_bench(loaded_tiny(), questions, judge, "stub", max_new_tokens=4, progress=False)
    assert [s["id"] for s in samples] == ["1#t1", "1#t2", "2#t1", "2#t2"]
    assert metric["score"] == 7.0 and metric["score_turn1"] == 7.0 and metric["score_turn2"] is None
    assert metric["rated"] == 2 and metric["unparsed"] == 2 and metric["n"] == 2
    # the judge sees the conversation so far with the model's own replies, and the reference if any
    assert "User: Now make it sad." in seen[1] and f"Assistant: {samples[0]['answer']}" in seen[1]
    assert "reference answer" in seen[3] and "\n6\n" in seen[3] and "reference" not in seen[0]
    assert judge_prompt(questions[1], ["4", "6"], 0).count("User: ") == 1


def test_mt_bench_bad_input_is_one_clear_error(tmp_path):
    from quantshift.evaluation.judge import check_judge_spec, load_questions

    with pytest.raises(DataError, match="does not exist"):
        load_questions(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_questions(bad)
    with pytest.raises(ConfigError, match="hf:<hub id"):
        check_judge_spec("gpt4")
    check_judge_spec("openai:gpt-4o@https://api.example.com/v1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantshift.cli",
            "eval",
            "smollm2-135m",
            "--mt-bench",
            str(tmp_path / "missing.jsonl"),
            "--judge",
            "hf:x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_task_split_is_the_same_in_every_process():
    """Items sharing a passage form one split unit; which unit lands on which side must not depend
    on Python's per-process string hashing (a resumed study, or the fp model evaluated in another
    process than the quantized ones, would score different items)."""
    script = r"""
from quantshift.evaluation.taskdef import TaskDef
from quantshift.evaluation.tasks import split_items
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
items = []
for p in range(60):  # per unit: passage A, passage B, and an item quoting both (it joins A and B)
    a = " ".join(words[(p + k) % len(words)] + f"a{p}" for k in range(16))
    b = " ".join(words[(p + k) % len(words)] + f"b{p}" for k in range(16))
    items += [{"id": f"u{p}-a", "query": a + " ?", "choices": ["x", "y"], "gold": 0},
              {"id": f"u{p}-b", "query": b + " ?", "choices": ["x", "y"], "gold": 0},
              {"id": f"u{p}-c", "query": b + " and " + a + " ?", "choices": ["x", "y"], "gold": 0}]
task = TaskDef("toy_split", "toy", "x", lambda d: items)
print(",".join(sorted(it["id"] for it in split_items(task, items).test)))
"""
    outs = set()
    for seed in ("1", "2", "3"):
        env = dict(__import__("os").environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.add(r.stdout.strip())
    assert len(outs) == 1
    test_ids = next(iter(outs)).split(",")
    # a unit's three items go to one side together
    assert all({i.split("-")[0] + s for s in ("-a", "-b", "-c")} <= set(test_ids) for i in test_ids)


CHAT = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_chat_template_renders_requests_as_the_tokenizer_does(monkeypatch):
    """--chat-template: each request's context is what tokenizer.apply_chat_template makes of the
    prompt (few-shot examples as earlier turns); off and template-less tokenizers keep raw prompts."""
    from lm_eval.models.huggingface import HFLM

    seen = []
    real = HFLM.loglikelihood

    def spy(self, requests, disable_tqdm=False):
        seen.extend(r.args for r in requests)
        return real(self, requests, disable_tqdm)

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    chat = loaded_tiny()
    chat.tokenizer.chat_template = CHAT
    queries = {it["query"] for it in _toy_items()}
    r = evaluate(chat, tasks=[TOY], shots=(0, 2), limit=2, progress=False, chat_template="auto")
    assert r.metrics["task:toy_follow@0"]["chat_template"] is True
    zero, two = seen[:4], seen[4:]
    for ctx, _cont in zero:
        query = next(q for q in queries if f"]{q}\n" in ctx)
        assert ctx == chat.tokenizer.apply_chat_template(
            [{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True
        )
    assert all(ctx.count("[user]") == 3 and ctx.count("[assistant]") == 3 for ctx, _ in two)  # 2 shots as turns
    seen.clear()
    r = evaluate(chat, tasks=[TOY], shots=(0,), limit=2, progress=False, chat_template="off")
    assert r.metrics["task:toy_follow@0"]["chat_template"] is False and all(ctx in queries for ctx, _ in seen)
    base = loaded_tiny()  # no template: auto is off, on is an error before any scoring
    seen.clear()
    assert (
        evaluate(base, tasks=[TOY], limit=2, progress=False, chat_template="auto").metrics["task:toy_follow@0"][
            "chat_template"
        ]
        is False
    )
    with pytest.raises(ConfigError, match="no chat template"):
        evaluate(base, tasks=[TOY], limit=2, progress=False, chat_template="on")
    with pytest.raises(ConfigError, match="--chat-template must be off, auto, on"):
        evaluate(base, tasks=[TOY], limit=2, progress=False, chat_template="yes")


def test_a_tasks_own_shot_count_is_its_default_not_a_lock(tmp_path):
    """BOSS-shaped: a task with its own count runs at it when no shots are asked for, and at exactly
    the asked counts otherwise; a study lists both (its shots and the task's own), so the BOSS
    preset's 0-shot rows exist beside BOSS's counts."""
    import dataclasses

    from quantshift.studies.spec import eval_units, study_from_dict

    own = dataclasses.replace(TOY, name="toy_fixed", default_shots=2)
    assert set(evaluate(loaded_tiny(), tasks=[own], limit=2, progress=False).metrics) == {"task:toy_fixed@2"}
    assert set(evaluate(loaded_tiny(), tasks=[own], shots=(0,), limit=2, progress=False).metrics) == {
        "task:toy_fixed@0"
    }
    model = tmp_path / "m"
    model.mkdir()
    spec = study_from_dict(
        {
            "name": "b",
            "models": [str(model)],
            "methods": [{"method": "rtn", "wbits": [4]}],
            "evaluation": {"tasks": ["boss_sa_amazon", "boss_eqa_squad"], "shots": [0]},
        }
    )
    assert [(u.name, u.shots) for u in eval_units(spec)] == [
        ("boss_sa_amazon", 0),
        ("boss_eqa_squad", 0),
        ("boss_sa_amazon", 3),
        ("boss_eqa_squad", 1),
    ]


# ---------------------------------------------------------------- instruction following (verifiable)


def _obeying(checks: list[dict]) -> str:
    """A response that follows every instruction given (built from the checks alone)."""
    kinds = {c["kind"]: c for c in checks}
    words = ["word"] * (kinds["min_words"]["n"] if "min_words" in kinds else 5)
    if "include_word" in kinds:
        words[0] = kinds["include_word"]["word"]
    if "start_word" in kinds:
        words.insert(0, kinds["start_word"]["word"])
    body = " ".join(words)
    if "json" in kinds:
        return json.dumps({"answer": body})
    if "placeholders" in kinds:
        body += " " + " ".join("[name]" for _ in range(kinds["placeholders"]["n"]))
    if "bullets" in kinds:
        body = body + "\n" + "\n".join("* point" for _ in range(kinds["bullets"]["n"]))
    if "sections" in kinds:
        body = "\n".join(f"SECTION {i + 1}\n{body}" for i in range(kinds["sections"]["n"]))
    if "title" in kinds:
        body = "<<A title>>\n" + body
    if "postscript" in kinds:
        body += "\nP.S. more"
    if "end_phrase" in kinds:
        body += " " + kinds["end_phrase"]["phrase"]
    if "quoted" in kinds:
        body = f'"{body}"'
    if "lowercase" in kinds:
        body = body.lower()
    if "uppercase" in kinds:
        body = body.upper()
    if "max_words" in kinds:
        assert len(body.split()) < kinds["max_words"]["n"]
    return body


def test_instruction_following_set_is_offline_deterministic_and_consistent():
    from quantshift.evaluation.instructions import KINDS, N_PROMPTS, build_items, follows, process_results

    items = TASKS.get("if_verifiable").load_items(None)
    assert len(items) == N_PROMPTS == 320 and len({it["id"] for it in items}) == 320
    assert items == build_items()  # seeded per prompt: the same set on every machine
    counts: dict[str, int] = {}
    for it in items:
        checks = json.loads(it["checks"])
        assert 1 <= len(checks) <= 2 and it["query"].startswith("Write ")
        parts = [KINDS[c["kind"]].parts for c in checks]
        assert len(parts) == 1 or not (parts[0] & parts[1])  # never two instructions on one part of the answer
        for c in checks:
            counts[c["kind"]] = counts.get(c["kind"], 0) + 1
        # a response built to obey passes every check (the test below checks that each check rejects)
        assert all(follows(_obeying(checks), checks)), (it["query"], _obeying(checks))
        assert process_results(it, [_obeying(checks)]) == {"acc": 1.0, "inst_acc": 1.0}
    assert set(counts) == set(KINDS) and min(counts.values()) >= 10  # every kind, each at least 10 times
    assert process_results({"checks": json.dumps([{"kind": "no_commas"}, {"kind": "lowercase"}])}, ["a, b"]) == {
        "acc": 0.0,
        "inst_acc": 0.5,
    }


@pytest.mark.parametrize(
    "kind,params,good,bad",
    [
        ("include_word", {"word": "light"}, "The light was soft.", "The lights were soft."),
        ("exclude_word", {"word": "ocean"}, "Waves and sea.", "The Ocean is wide."),
        ("lowercase", {}, "all lower here", "Not lower"),
        ("uppercase", {}, "ALL UPPER 42", "ALL upper"),
        ("max_words", {"n": 5}, "one two three four", "one two three four five"),
        ("min_words", {"n": 3}, "one two three", "one two"),
        ("end_phrase", {"phrase": "That is all."}, "Text. That is all.  ", "That is all. More."),
        ("postscript", {}, "Body\nP.S. also", "Body PS also"),
        ("start_word", {"word": "Yes"}, "yes, it is", "Well yes"),
        ("no_commas", {}, "no commas here", "a, b"),
        ("bullets", {"n": 2}, "Intro\n* a\n* b", "* a\n* b\n* c"),
        ("quoted", {}, '"quoted"', 'not "quoted"'),
        ("title", {}, "<<Title>>\ntext", "<Title>\ntext"),
        ("placeholders", {"n": 2}, "[a] and [b]", "[a] only"),
        ("json", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
        ("sections", {"n": 2}, "SECTION 1\nx\nSECTION 2\ny", "SECTION 1\nx"),
    ],
)
def test_each_instruction_check_accepts_and_rejects(kind, params, good, bad):
    from quantshift.evaluation.instructions import follows

    assert follows(good, [{"kind": kind, **params}]) == [True]
    assert follows(bad, [{"kind": kind, **params}]) == [False]


def test_instruction_task_runs_through_lm_eval_with_its_scores():
    r = evaluate(loaded_tiny(), tasks=[TASKS.get("if_verifiable")], shots=(0,), limit=3, progress=False)
    m = r.metrics["task:if_verifiable@0"]
    assert m["n"] == 3 and 0 <= m["acc"] <= m["inst_acc"] <= 1 and "inst_acc_ci" in m
    assert all(isinstance(s["pred"], str) for s in r.samples["task:if_verifiable@0"])


def test_generated_arithmetic_task_is_deterministic_with_one_right_answer():
    """arithmetic_mc: the same 600 items everywhere, unique ids, four distinct choices with the
    gold index on the true result, difficulty labels 1-4, and the instruct-local suite's types."""
    from quantshift.evaluation.arithmetic import build_items
    from quantshift.evaluation.tasks import task_data

    items = build_items()
    assert items == build_items() and len(items) == 600 and len({it["id"] for it in items}) == 600
    for it in items:
        a, op, b = it["query"].removeprefix("Question: What is ").removesuffix("?\nAnswer:").split()
        truth = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b), "/": int(a) / int(b)}[op]
        assert len(set(it["choices"])) == 4 and 0 <= it["gold"] < 4 and float(it["choices"][it["gold"]]) == truth
        assert it["difficulty"] in (1, 2, 4)
    d = task_data("arithmetic_mc")
    assert len(d.test) > 250 and len(d.pool) > 250
    local = SUITES.get("instruct-local")
    assert {local.category_of(t) for t in local.tasks} == {"knowledge_language", "mathematics", "instruction_following"}
