"""Study runner: strict specs, cache/resume after SIGKILL, byte-identical reruns, ray == local."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import loaded_tiny

from quantshift.errors import ConfigError
from quantshift.studies.analysis import is_iid, paired_test
from quantshift.studies.spec import expand, study_from_dict

TEXTS = {
    "prose": "The river bends slowly past the old mill, where farmers bring grain each autumn and talk about the weather. ",
    "digits": "3141 5926 5358 9793 2384 6264 3383 2795 0288 4197 1693 9937 5105 8209 7494 4592 3078 1640 6286 2089 ",
    "code": "def f(x):\n    return [i * x for i in range(10) if i % 2 == 0]\nclass A: pass\nprint(f(3), A())\n",
}


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    loaded = loaded_tiny("llama")
    model_dir = root / "tiny-llama"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    sources = {}
    for name, unit in TEXTS.items():
        p = root / f"{name}.txt"
        # 25 paragraphs: every fifth is held out for perplexity, the rest feed calibration
        p.write_text("\n\n".join(f"{i} " + unit * 3 for i in range(25)))
        sources[name] = str(p)
    return {"root": root, "model": str(model_dir), "sources": sources}


def tiny_study(env: dict, name: str = "tiny", **over) -> dict:
    src = list(env["sources"].values())
    spec = {
        "name": name,
        "models": [env["model"]],
        "methods": [
            {"method": "rtn", "wbits": [4], "group_size": 32},
            {"method": "gptq", "wbits": [4, 3], "group_size": 32},
        ],
        "calibration": {"sources": src, "n": 4, "seqlen": 32, "seeds": [42]},
        "evaluation": {"ppl": src, "ppl_seqlen": 32, "ppl_windows": 3},
        "diagnostics": {"windows": 2, "seqlen": 32},
        "device": "cpu",
    }
    spec.update(over)
    return spec


def write_study(env: dict, spec: dict) -> Path:
    p = env["root"] / f"{spec['name']}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "quantshift.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_cli(args: list[str], cwd: Path) -> str:
    p = cli(args, cwd)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def strip_times(text: str) -> str:
    """The report without its last section, the per-cell compute seconds recorded in the cache."""
    return text.split("## Cells")[0]


def result_files(cache: Path) -> dict[str, tuple[float, str]]:
    d = cache / "results"
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


# ---------------------------------------------------------------- spec validation


def test_unknown_key_is_named(tiny_env):
    spec = tiny_study(tiny_env)
    spec["calibration"]["nsamples"] = 8
    with pytest.raises(ConfigError, match=r"unknown key 'calibration.nsamples'.*allowed: .*mode, n, order"):
        study_from_dict(spec)
    spec = tiny_study(tiny_env, colour="red")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        study_from_dict(spec)


def test_unregistered_method_and_source_are_clear(tiny_env):
    spec = study_from_dict(tiny_study(tiny_env, methods=[{"method": "no-such-method", "wbits": 4}]))
    with pytest.raises(ConfigError, match="method 'no-such-method' is not registered.*available: .*gptq"):
        expand(spec)
    bad = tiny_study(tiny_env)
    bad["calibration"]["sources"] = ["no-such-source"]
    with pytest.raises(ConfigError, match="source 'no-such-source' is not available"):
        expand(study_from_dict(bad))


def test_grid_expansion_shares_calibration_free_cells(tiny_env):
    cells = expand(study_from_dict(tiny_study(tiny_env)))
    # fp + rtn (one cell, no calibration) + gptq x 2 bits x 3 sources
    assert len(cells) == 1 + 1 + 6
    assert [c.method for c in cells[:2]] == ["fp", "rtn"] and cells[1].calib is None


def test_iid_and_bootstrap():
    assert is_iid("wikipedia", "ppl:wikipedia") and not is_iid("news", "ppl:wikipedia")
    assert is_iid("task:arc_easy", "task:arc_easy@5") and not is_iid("arc_easy", "task:arc_easy@0")
    a = {str(i): 1.0 for i in range(40)}
    b = {str(i): float(i % 2) for i in range(40)}
    delta, p = paired_test(a, b)
    assert delta == pytest.approx(0.5) and p < 0.01
    delta, p = paired_test(a, a)
    assert delta == 0 and p == 1.0
    # two perplexity windows that both favour one calibration set prove nothing
    delta, p = paired_test({"w0": -2.0, "w1": -2.1}, {"w0": -2.5, "w1": -2.6})
    assert delta == pytest.approx(0.5) and p == 0.5


def test_examples_mode_packs_whole_examples(tiny_env):
    from conftest import toy_tokenizer

    from quantshift.data.calibset import pack_examples
    from quantshift.studies.spec import CalibChoice

    docs = [f"doc {i} " + "x" * (10 + i) for i in range(20)]
    tok = toy_tokenizer()
    first = pack_examples(docs, tok, CalibChoice("d", 4, 16, 42, "examples", "first"))
    flat = first.flatten().tolist()
    # the first 4 documents, each cut to 16 tokens, EOS-separated, packed into rows of 16
    want = sum((tok(d, add_special_tokens=False)["input_ids"][:16] + [tok.eos_token_id] for d in docs[:4]), [])
    assert first.shape[1] == 16 and flat == want[: len(flat)] and len(want) - len(flat) < 16
    a = pack_examples(docs, tok, CalibChoice("d", 4, 16, 1, "examples", "random"))
    b = pack_examples(docs, tok, CalibChoice("d", 4, 16, 2, "examples", "random"))
    assert a.shape[1] == 16 and not (a.shape == b.shape and bool((a == b).all()))
    with pytest.raises(Exception, match="has 20 examples; asked for 21"):
        pack_examples(docs, tok, CalibChoice("d", 21, 16, 1, "examples", "first"))


def test_task_glob_is_iid():
    assert is_iid("task:ceval_*", "task:ceval_stem@5") and not is_iid("task:ceval_*", "task:cmmlu_stem@5")


# ---------------------------------------------------------------- running


def test_kill_resume_and_byte_identical_rerun(tiny_env, tmp_path):
    spec = tiny_study(tiny_env, name="killme")
    study = write_study(tiny_env, spec)
    # the reference: an uninterrupted run in its own directory and cache
    run_cli(
        ["run", str(study), "--out", str(tmp_path / "ref"), "--cache", str(tmp_path / "ref-cache"), "--quiet"], tmp_path
    )
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())

    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["run", str(study), "--out", str(out), "--cache", str(cache), "--quiet"]
    proc = cli(args, tmp_path)
    deadline = time.time() + 300
    while len(result_files(cache)) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real kill -9: no handler, no cleanup
    proc.wait()
    before = result_files(cache)
    assert before, "the study produced no result before the kill"
    log = run_cli(args, tmp_path)
    after = result_files(cache)
    for name, (mtime, text) in before.items():  # nothing finished was lost or recomputed
        assert after[name] == (mtime, text), name
    n_total = len(after)
    assert f"{n_total - len(before)} results computed" in log, log
    got = json.loads((out / "results.json").read_text())
    assert got["cells"] == ref["cells"] and got["diagnostics"] == ref["diagnostics"]
    assert all(c["status"] == "done" for c in got["cells"])

    # a finished study: rerun does nothing and rewrites the same bytes
    files = {p: (out / p).read_bytes() for p in ("report.md", "report.html", "results.json", "figures/sensitivity.png")}
    log = run_cli(args, tmp_path)
    assert "0 results computed" in log and "0 to run" in log, log
    assert result_files(cache) == after
    for p, data in files.items():
        assert (out / p).read_bytes() == data, p
    report = (out / "report.md").read_text()
    assert "†" in report and "**" in report and "Findings (computed)" in report
    assert strip_times((tmp_path / "ref" / "report.md").read_text()) == strip_times(report), (
        "interrupted and clean runs differ"
    )
    # `report` alone rebuilds the same report from the cache
    (out / "report.md").unlink()
    run_cli(["report", str(out)], tmp_path)
    assert (out / "report.md").read_bytes() == files["report.md"]


def test_failed_cell_is_recorded_and_others_finish(tiny_env, tmp_path):
    from quantshift.studies.runner import run_study

    short = tmp_path / "short.txt"
    short.write_text("too little text\n\nfor a calibration set")
    spec = tiny_study(tiny_env, name="fails", diagnostics={"enabled": False})
    spec["methods"] = [{"method": "gptq", "wbits": [4], "group_size": 32}]
    spec["calibration"]["sources"] = [tiny_env["sources"]["prose"], str(short)]
    summary = run_study(
        study_from_dict(spec), tmp_path / "out", tmp_path / "cache", progress=False, echo=lambda *_: None
    )
    assert summary["failed"] == 1
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    status = {c["label"].split("/", 1)[1]: c["status"] for c in res["cells"]}
    assert status == {"fp-w16/-": "done", "gptq-w4/prose/s42": "done", "gptq-w4/short/s42": "failed"}
    failed = next(c for c in res["cells"] if c["status"] == "failed")
    assert "DataError" in failed["error"] and "short.txt" in failed["error"]
    assert "failed" in (tmp_path / "out" / "report.md").read_text()


def test_local_worker_processes_match_in_process_run(tiny_env, tmp_path, monkeypatch):
    """--jobs 2 runs works in two spawned processes; with one thread everywhere (same float
    summation order) every result and the report equal the in-process run's."""
    from quantshift.studies.runner import run_study

    study = study_from_dict(tiny_study(tiny_env, name="jobs"))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(study, tmp_path / "one", tmp_path / "c1", progress=False, echo=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    from quantshift.studies import executors

    calls = []
    real = executors.run_local

    def one_thread_each(*args, **kw):  # whatever this machine's core count
        calls.append(kw["jobs"])
        return real(*args, **kw, threads=1)

    monkeypatch.setattr(executors, "run_local", one_thread_each)
    # progress on: the workers' bars are pinned to their own terminal lines (must not break anything)
    summary = run_study(study, tmp_path / "two", tmp_path / "c2", progress=True, echo=lambda *_: None, jobs=2)
    assert calls == [2] and summary["failed"] == 0
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert all(c["status"] == "done" for c in a["cells"]) and len(a["cells"]) == len(b["cells"])
    assert a["cells"] == b["cells"] and a["diagnostics"] == b["diagnostics"]
    assert (tmp_path / "one" / "report.md").read_text().split("## Cells")[0] == (
        tmp_path / "two" / "report.md"
    ).read_text().split("## Cells")[0]


def _dies_on_crash_label(work, cache_root, options, flight, progress=False):
    """Stands in for the worker function: marks itself in flight, then dies hard on 'crash'."""
    (Path(flight) / work["key"]).touch()
    if work["label"] == "crash":
        os._exit(9)  # as the OOM killer would: no exception, no cleanup
    (Path(flight) / work["key"]).unlink()
    return {"key": work["key"], "label": work["label"], "ok": True, "computed": [], "seconds": 0.0}


def test_dead_worker_fails_only_the_work_it_was_running(tmp_path):
    """A worker killed mid-work breaks its process pool; that work is recorded as failed and the
    works not yet started run in a new pool."""
    from quantshift.studies import executors

    works = [
        {"key": k, "label": label} for k, label in (("a", "first"), ("b", "crash"), ("c", "third"), ("d", "fourth"))
    ]
    done: list[dict] = []
    todo, rounds = works, 0
    while todo:  # as run_local does; one worker, so the order is fixed
        todo = executors._run_pool(todo, str(tmp_path), {}, done.append, 1, 1, str(tmp_path), run=_dies_on_crash_label)
        rounds += 1
    status = {d["label"]: d["ok"] for d in done}
    assert status == {"first": True, "crash": False, "third": True, "fourth": True} and rounds == 2
    assert "died" in next(d["error"] for d in done if not d["ok"])


def _sleeps(work, cache_root, options, flight, progress=False):
    """Stands in for the worker function: a work that takes a minute."""
    (Path(flight) / work["key"]).touch()
    (Path(cache_root) / f"pid-{os.getpid()}").write_text("")
    time.sleep(60)
    return {"key": work["key"], "label": work["label"], "ok": True, "computed": [], "seconds": 60.0}


def test_interrupt_stops_worker_processes_at_once(tmp_path):
    """Ctrl-C (SIGINT to the study process only) kills its workers instead of waiting for their works."""
    script = tmp_path / "pool.py"
    script.write_text(
        "import signal, sys\n"
        # a process started in the background by a non-interactive shell inherits SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler: restore it, as a terminal has it
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_studies import _sleeps\n"
        "from quantshift.studies import executors\n"
        "if __name__ == '__main__':\n"
        f"    executors._run_pool([{{'key': k, 'label': k}} for k in 'abcd'], {str(tmp_path)!r}, {{}}, print, 2, 1,\n"
        f"                        {str(tmp_path)!r}, run=_sleeps)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("pid-*"))) < 2:  # both workers inside a work
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.time() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    pids = [int(p.name[4:]) for p in tmp_path.glob("pid-*")]
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_jobs_must_be_positive_and_local(tiny_env, tmp_path):
    from quantshift.errors import ConfigError
    from quantshift.studies.runner import run_study

    study = study_from_dict(tiny_study(tiny_env, name="badjobs"))
    with pytest.raises(ConfigError, match="jobs must be 1 or more"):
        run_study(study, tmp_path / "o", tmp_path / "c", progress=False, echo=lambda *_: None, jobs=0)
    with pytest.raises(ConfigError, match="local executor"):
        run_study(study, tmp_path / "o", tmp_path / "c", executor="ray", progress=False, echo=lambda *_: None, jobs=2)


@pytest.mark.slow
def test_ray_executor_matches_local(tiny_env, tmp_path):
    ray = pytest.importorskip("ray")
    from quantshift.studies.runner import run_study

    spec = tiny_study(tiny_env, name="rayed")
    spec["methods"] = [{"method": "gptq", "wbits": [4], "group_size": 32}]
    study = study_from_dict(spec)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray's workers (OMP_NUM_THREADS=1): same float summation order
    try:
        run_study(study, tmp_path / "local", tmp_path / "c1", progress=False, echo=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # no /dev/shm, sandboxed sockets, ...
        pytest.skip(f"ray cannot start here: {err}")
    try:
        run_study(study, tmp_path / "ray", tmp_path / "c2", executor="ray", progress=False, echo=lambda *_: None)
    finally:
        ray.shutdown()
    a = json.loads((tmp_path / "local" / "results.json").read_text())
    b = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert all(c["status"] == "done" for c in a["cells"])
    assert a["cells"] == b["cells"] and a["diagnostics"] == b["diagnostics"]
    assert (tmp_path / "local" / "report.md").read_text().split("## Cells")[0] == (
        tmp_path / "ray" / "report.md"
    ).read_text().split("## Cells")[0]


def test_report_on_task_results_marks_iid_best_and_significance(tmp_path):
    """The report from synthetic task results: I.I.D. cell marked, best in bold, bootstrap p computed."""
    from quantshift.studies.analysis import iid_findings, sensitivity
    from quantshift.studies.document import to_markdown
    from quantshift.studies.report import build_blocks
    from quantshift.studies.spec import EvalUnit

    spec = study_from_dict(
        {
            "name": "synthetic",
            "models": ["m"],
            "methods": [{"method": "gptq", "wbits": [4]}],
            "calibration": {"sources": ["task:a", "wikipedia"]},
            "evaluation": {"tasks": ["a", "b"]},
        }
    )
    units = [EvalUnit("task", "a", 0), EvalUnit("task", "b", 0)]

    def cell(method, wbits, calib, accs):
        metrics, samples = {}, {}
        for u, (acc, cat) in zip(units, accs):
            scores = [1.0] * int(40 * acc) + [0.0] * (40 - int(40 * acc))
            metrics[u.key] = {"acc": acc, "acc_ci": [acc - 0.1, acc + 0.1], "n": 40, "category": cat}
            samples[u.key] = [{"id": str(i), "acc": s} for i, s in enumerate(scores)]
        return {
            "model": {"name": "m"},
            "method": method,
            "wbits": wbits,
            "recipe": None if method == "fp" else {},
            "calib": None if calib is None else {"source": calib, "seed": 42},
            "label": f"{method}/{calib}",
            "key": method + str(calib),
            "status": "done",
            "metrics": metrics,
            "samples": samples,
            "error": None,
            "calib_manifest": None,
            "quant_seconds": 1.0,
            "eval_seconds": 1.0,
        }

    cells = [
        cell("fp", 16, None, [(0.9, "qa"), (0.6, "nli")]),
        cell("gptq", 4, "task:a", [(0.85, "qa"), (0.5, "nli")]),
        cell("gptq", 4, "wikipedia", [(0.4, "qa"), (0.55, "nli")]),
    ]
    md = to_markdown(
        build_blocks({"spec": spec, "units": units, "cells": cells, "diagnostics": {}, "versions": {}}, tmp_path)
    )
    assert "| task:a | **85.0±10.0†** | 50.0±10.0 |" in md
    assert "| wikipedia | 40.0±10.0 | **55.0±10.0** |" in md
    (row,) = iid_findings(cells, units)
    assert row["iid"] == "task:a" and row["iid_rank"] == 1 and row["p"] < 0.01
    sens = {r["test"]: r for r in sensitivity(cells, units)}
    assert sens["task:a@0"]["drops"][4] == pytest.approx(0.9 - 0.625) and sens["task:a@0"]["category"] == "qa"
    assert "By category (most to least sensitive): qa" in md


def test_ppl_with_samples_matches_perplexity_protocol(tiny_env, tiny_llama):
    from quantshift.evaluation.perplexity import perplexity
    from quantshift.studies.work import ppl_with_samples

    src = tiny_env["sources"]["prose"]
    metric, samples = ppl_with_samples(tiny_llama, src, 32, 3, 2, False)
    ref = perplexity(tiny_llama.model, tiny_llama.tokenizer, src, seqlen=32, max_windows=3, progress=False)
    assert metric["ppl"] == pytest.approx(ref.ppl, rel=1e-5) and metric["tokens"] == ref.tokens and len(samples) == 3


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parent.parent / "studies").glob("*.yaml")))
def test_shipped_presets_are_valid_grids(preset):
    """Every preset in studies/ parses strictly and expands: its methods, calibration sources and
    tasks all exist (data-dir tasks are resolved by name; their files are read only when run)."""
    from quantshift.studies.spec import eval_units, expand, load_study

    spec = load_study(Path(__file__).parent.parent / "studies" / preset)
    cells = expand(spec)
    assert len(cells) >= 2 and eval_units(spec)


def test_fp_propagation_study_reuses_hessians_across_bits_and_unions(tiny_env, tmp_path, monkeypatch):
    """With calibration.propagate fp, each source's Hessians are computed once (at the first bit
    width) and reused by the other bit width and by the union source a+b: two forward passes."""
    from quantshift.quant.engine import BlockEngine
    from quantshift.studies.runner import run_study

    a, b = list(tiny_env["sources"].values())[:2]
    spec = tiny_study(
        tiny_env,
        name="fp-stats",
        methods=[{"method": "gptq", "wbits": [4, 3], "group_size": 32}],
        calibration={"sources": [a, b, f"{a}+{b}"], "n": 4, "seqlen": 32, "seeds": [42], "propagate": "fp"},
        evaluation={"ppl": [a], "ppl_seqlen": 32, "ppl_windows": 2},
        include_fp=False,
        diagnostics={"enabled": False},
    )
    calls = []
    original = BlockEngine.capture
    monkeypatch.setattr(BlockEngine, "capture", lambda self, ids: (calls.append(ids.shape), original(self, ids))[1])
    run_study(study_from_dict(spec), tmp_path / "out", tmp_path / "cache", progress=False, echo=lambda *_: None)
    assert calls == [(4, 32), (4, 32)]  # a and b at W4; W3 and both a+b cells read the cache
    assert len(list((tmp_path / "cache" / "stats").rglob("block-*.safetensors"))) == 4
    results = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "results").glob("*.json")]
    assert len(results) == 6 and all(r["metric"]["ppl"] > 1 for r in results)


def test_chat_template_is_in_task_keys_only_when_used(tiny_env):
    """Off (the default) leaves every existing task key as it was; auto/on change the key, so a
    templated result is never read back as a raw-prompt one. A typo names the allowed values."""
    from quantshift.studies.keys import unit_settings
    from quantshift.studies.spec import EvalUnit

    unit = EvalUnit("task", "movie_sentiment", 0)
    ev = {"ppl": [], "tasks": ["movie_sentiment"]}
    off = unit_settings(study_from_dict(tiny_study(tiny_env, evaluation=ev)), unit)
    auto = unit_settings(study_from_dict(tiny_study(tiny_env, evaluation={**ev, "chat_template": "auto"})), unit)
    assert "chat_template" not in off and auto == {**off, "chat_template": "auto"}
    with pytest.raises(Exception, match="chat_template"):
        study_from_dict(tiny_study(tiny_env, evaluation={**ev, "chat_template": "yes"}))


def test_chat_template_ablation_adds_raw_twins_to_the_unquantized_works_only(tiny_env):
    """The ablation plans each task again without the template, for fp works only; the raw twin's
    key equals a template-off study's key (a result computed once serves both); its own harness
    call (unit_batches never mixes templated and raw prompts); and asking for it with the
    template off is an error that names the fix."""
    from quantshift.studies.keys import unit_settings
    from quantshift.studies.runner import plan_study
    from quantshift.studies.work import unit_batches

    ev = {
        "ppl": [],
        "tasks": ["movie_sentiment", "emoji_movie"],
        "chat_template": "auto",
        "chat_template_ablation": True,
    }
    spec = study_from_dict(tiny_study(tiny_env, evaluation=ev))
    plan = plan_study(spec, on_gpu=False)
    fp = next(w for w in plan.works if w["recipe"] is None)
    quant = [w for w in plan.works if w["recipe"] is not None]
    assert [u["name"] for u in fp["units"]] == ["movie_sentiment", "emoji_movie"] * 2
    assert all(len(w["units"]) == 2 for w in quant)
    raw = [u for u in fp["units"] if "chat_template" not in u["settings"]]
    off = study_from_dict(
        tiny_study(tiny_env, evaluation={**ev, "chat_template": "off", "chat_template_ablation": False})
    )
    assert [u["settings"] for u in raw] == [unit_settings(off, u) for u in plan.fp_units]
    assert sorted(len(b) for b in unit_batches(fp["units"])) == [2, 2]
    assert {b[0]["settings"].get("chat_template") for b in unit_batches(fp["units"])} == {"auto", None}
    with pytest.raises(ConfigError, match="chat_template_ablation .*auto or on"):
        study_from_dict(tiny_study(tiny_env, evaluation={**ev, "chat_template": "off"}))


def test_report_document_renders_pipe_tables_and_escaped_html(tmp_path):
    """Markdown: blocks one blank line apart, pipes inside a cell replaced (they would split it);
    HTML: inline markup through markdown-it, everything else escaped, figures embedded."""
    from quantshift.studies.document import Heading, Image, Paragraph, Table, to_html, to_markdown

    (tmp_path / "f.png").write_bytes(b"\x89PNG fake")
    blocks = [
        Heading(2, "A < B"),
        Paragraph("x **bold** & <script>y</script>"),
        Table(["h", "v"], [["a|b", "*i*"]]),
        Image("f.png", 'alt "q"'),
    ]
    assert to_markdown(blocks) == (
        '## A < B\n\nx **bold** & <script>y</script>\n\n| h | v |\n|---|---|\n| a/b | *i* |\n\n![alt "q"](f.png)\n'
    )
    html = to_html(blocks, tmp_path, "t & <x>")
    assert "<title>t &amp; &lt;x&gt;</title>" in html and "<h2>A &lt; B</h2>" in html
    assert "<p>x <strong>bold</strong> &amp; &lt;script&gt;y&lt;/script&gt;</p>" in html
    assert "<td>a|b</td><td><em>i</em></td>" in html
    assert 'alt="alt &#34;q&#34;" src="data:image/png;base64,iVBORyBmYWtl"' in html


def test_a_suite_relabels_the_tasks_it_borrows_in_the_study_report(tiny_env):
    """instruct-local lists mmlu_dev and movie_sentiment under knowledge_language: a study of that
    suite reports them there, not under the tasks' own categories (knowledge, sentiment) recorded
    with the results; the label is not part of a unit's key (cached results stay valid)."""
    from quantshift.studies.spec import EvalUnit, eval_units
    from quantshift.studies.task_types import unit_types

    spec = study_from_dict(tiny_study(tiny_env, evaluation={"ppl": [], "suite": "instruct-local"}))
    units = eval_units(spec)
    own = {"mmlu_dev": "knowledge", "movie_sentiment": "sentiment", "arithmetic_mc": "mathematics"}
    own["if_verifiable"] = "instruction_following"
    cells = [{"metrics": {u.key: {"acc": 0.5, "category": own[u.name]} for u in units}}]
    assert unit_types(cells, units) == {  # type: ignore[arg-type]
        "task:mmlu_dev@0": "knowledge_language",
        "task:movie_sentiment@0": "knowledge_language",
        "task:arithmetic_mc@0": "mathematics",
        "task:if_verifiable@0": "instruction_following",
    }
    assert EvalUnit("task", "mmlu_dev", 0, category="x") == EvalUnit("task", "mmlu_dev", 0)
    bare = [EvalUnit("task", u.name, u.shots) for u in units]  # no suite: the recorded category
    assert unit_types(cells, bare)["task:mmlu_dev@0"] == "knowledge"  # type: ignore[arg-type]
