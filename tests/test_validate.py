"""Validate first: bad options, recipes and studies fail before any model loads or file is written,
with exit code 2 and one line naming the value and what is allowed; `quantshift check` dry runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quantshift import validate
from quantshift.errors import ConfigError, InvalidInput

ROOT = Path(__file__).resolve().parents[1]


class ModelLoaded(AssertionError):
    """Raised by the stand-in loader: validation let the command reach the model load."""


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Run the CLI in process (main(), as the console script does) in an empty cwd; the model
    loader fails the test if called. Returns (exit code, stdout, stderr)."""
    import quantshift.cli as cli_mod
    import quantshift.models.load as load_mod

    def no_load(*a, **k):
        raise ModelLoaded("the model loader was called")

    monkeypatch.setattr(load_mod, "load_model", no_load)
    monkeypatch.setattr("quantshift.api.load_model", no_load)  # the API binds the loader by name
    monkeypatch.setattr("quantshift.threads.use_all_cores", lambda: None)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["quantshift", *args])
        code = 0
        try:
            cli_mod.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    run.cwd = work  # type: ignore[attr-defined]
    return run


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- the two reported examples


def test_negative_group_size_fails_before_load(cli, tmp_path):
    out = tmp_path / "X"
    code, _, err = cli(
        "quantize", "smollm2-135m", "--method", "rtn", "--wbits", "4", "--group-size", "-7", "--out", str(out)
    )
    line = one_line_error(err)
    assert code == 2
    assert "--group-size" in line and "-7" in line and "-1 (per channel)" in line
    assert not out.exists() and not any(cli.cwd.iterdir())


def test_unknown_task_fails_before_load(cli, monkeypatch):
    # lm-eval's index is replaced by a small one: the real one is exercised by the subprocess test
    monkeypatch.setattr(validate, "_lm_eval_quick_names", lambda: frozenset({"arc_easy", "hellaswag"}))
    monkeypatch.setattr(validate, "_lm_eval_all_names", lambda: frozenset({"arc_easy", "hellaswag"}))
    code, _, err = cli("eval", "smollm2-135m", "--tasks", "no_such_task_xyz")
    line = one_line_error(err)
    assert code == 2 and "unknown task 'no_such_task_xyz'" in line
    code, _, err = cli("eval", "smollm2-135m", "--tasks", "arc_easy,hellaswg")
    assert code == 2 and "did you mean 'hellaswag'" in one_line_error(err)


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["quantize", "smollm2-135m", "--method", "rtn", "--wbits", "4", "--group-size", "-7", "--out", "X"],
            "--group-size must be -1 (per channel), 0 (per tensor)",
        ),
        (["eval", "smollm2-135m", "--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
    ],
)
def test_reported_examples_as_a_user_runs_them(args, needle, tmp_path):
    """The real console entry point, real lm-eval task index: exit 2, one line, nothing written."""
    r = subprocess.run(
        [sys.executable, "-m", "quantshift.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2, r.stderr
    assert needle in one_line_error(r.stderr)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- recipes


def test_recipe_typo_names_key_and_suggestion(cli, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("stages:\n  - smoothquant: {alpha: 0.8}\n  - gptq: {wbits: 4, grup_size: 64}\n")
    code, _, err = cli("quantize", "smollm2-135m", "--recipe", str(rec), "--out", str(tmp_path / "o"))
    line = one_line_error(err)
    assert code == 2
    assert "unknown key 'grup_size'" in line and "did you mean 'group_size'" in line and "stage 1 (gptq)" in line
    assert not (tmp_path / "o").exists()


def test_recipe_top_level_and_override_typos(tmp_path):
    with pytest.raises(InvalidInput, match="unknown key 'stage' .*did you mean 'stages'"):
        validate.check_recipe_data({"stage": [{"rtn": {}}]})
    with pytest.raises(InvalidInput, match=r"overrides\[0\]: unknown key 'patern' .*did you mean 'pattern'"):
        validate.check_recipe_data([{"rtn": {"overrides": [{"patern": "down_proj", "wbits": 8}]}}])
    with pytest.raises(InvalidInput, match="unknown method 'gptqq' .*did you mean 'gptq'"):
        validate.check_recipe_data([{"gptqq": {"wbits": 4}}])


@pytest.mark.parametrize(
    "stages,needle",
    [
        ([{"rtn": {"group_size": -7}}], "group_size must be -1"),
        ([{"rtn": {"overrides": [{"pattern": "down", "wbits": 12}]}}], "overrides[0].wbits: wbits must be 2..8"),
        (
            [{"rtn": {"overrides": [{"pattern": "down", "group_size": -3}]}}],
            "overrides[0].group_size: group_size must be -1",
        ),
        ([{"spqr": {"overrides": [{"pattern": "down", "group_size": -1}]}}], "SpQR needs small groups"),
        ([{"rtn": {"targets": ["q_proj("]}}], "invalid regex 'q_proj('"),
        ([{"gptq": {"damp": -0.1}}], "damp must be"),
        ([{"gptq": {"damp": float("nan")}}], "damp must be"),
        ([{"gptq": {"block_size": 0}}], "block_size must be a number >= 1"),
        ([{"quip": {"seed": -1}}], "seed must be an integer 0.."),
        ([{"quip": {}}, {"gptq": {"wbits": 4}}], "after 'quip' would re-quantize"),
        ([{"gptq": 4}], "options must be a mapping"),
        ([{"rtn": {}, "gptq": {}}], "one-key mapping"),
        ([], "non-empty list of stages"),
    ],
)
def test_recipe_values_the_engine_would_refuse_late(stages, needle):
    with pytest.raises(ConfigError) as info:  # InvalidInput, or the method config's own check (damp)
        validate.check_recipe_data(stages)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_valid_recipes_pass():
    rec = validate.check_recipe_data(
        {
            "stages": [
                {"smoothquant": {"alpha": 0.8, "quantize": False}},
                {"gptq": {"wbits": 4, "group_size": 128, "abits": 8}},
            ]
        }
    )
    assert [s.method for s in rec.stages] == ["smoothquant", "gptq"]
    validate.check_recipe_data([{"kvcache": {"bits": 8}}, {"quip": {"wbits": 2}}])
    validate.check_recipe_data([{"quip": {"wbits": 2}}, {"rtn": {"wbits": 16, "abits": 8}}])  # activations only
    validate.check_recipe_data(["rtn"])


@pytest.mark.parametrize(
    "text,needle",
    [
        ("stages: [", "not valid YAML"),
        ("42\n", "non-empty list of stages"),
        ("", "non-empty list of stages"),
    ],
)
def test_recipe_files_that_are_not_recipes(text, needle, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(InvalidInput, match=needle):
        validate.check_recipe_file(p)


def test_binary_recipe_file_is_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"\xff\xfe\x00stages")
    with pytest.raises(InvalidInput, match="cannot read"):
        validate.check_recipe_file(p)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "rtn", "--wbits", "9"], "--wbits must be 2..8"),
        (["--method", "fp8", "--wbits", "4"], "fp8 is 8 bits"),
        (["--method", "quip", "--wbits", "8"], "QuIP is a 2-4 bit method"),
        (["--method", "smoothquant+gptq"], "stacks are a comma list"),
        (["--method", ","], "--method must name a method"),
        (["--method", "rtn", "--nsamples", "0"], "--nsamples must be an integer 1.."),
        (["--method", "rtn", "--seqlen", "1"], "--seqlen must be an integer 2.."),
        (["--method", "rtn", "--seed", "-1"], "--seed must be an integer 0.."),
        (["--method", "rtn", "--batch-size", "0"], "--batch-size must be an integer 1.."),
        (["--method", "rtn", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--method", "rtn", "--dtype", "float64"], "--dtype: unknown dtype 'float64'"),
        (["--method", "rtn", "--calib", "wikipeda"], "did you mean 'wikipedia'"),
        (["--method", "rtn", "--calib", "wikipedia+"], "empty source name in a '+' union"),
        (["--method", "rtn", "--calib", "missing.txt"], "text file 'missing.txt' does not exist"),
        (["--method", "rtn", "--calib", "task:no_such_*"], "unknown task 'no_such_*'"),
        (["--method", "rtn", "--data-dir", "nowhere"], "--data-dir 'nowhere' does not exist"),
        (["--method", "gptq", "--calib", "news", "--nsamples", "100000"], "calibration"),
    ],
)
def test_quantize_options(cli, args, needle, tmp_path):
    code, _, err = cli("quantize", "smollm2-135m", *args, "--out", str(tmp_path / "o"))
    assert code == 2 and needle in one_line_error(err)
    assert not (tmp_path / "o").exists() and not any(cli.cwd.iterdir())


def test_quantize_refuses_a_nonempty_out_dir_before_the_work(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("quantize", "smollm2-135m", "--method", "rtn", "--out", str(out))
    assert code == 2 and "exists and is not empty" in one_line_error(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_valid_quantize_reaches_the_loader(cli, tmp_path):
    """Validation must not reject what is fine: this run gets as far as loading the model."""
    with pytest.raises(ModelLoaded):
        cli(
            "quantize",
            "smollm2-135m",
            "--method",
            "gptq",
            "--wbits",
            "3",
            "--group-size",
            "64",
            "--calib",
            "wikipedia+news",
            "--nsamples",
            "16",
            "--out",
            str(tmp_path / "o"),
        )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "smollm2-135m", "--ppl", "wikipedai"], "did you mean 'wikipedia'"),
        (["eval", "smollm2-135m", "--suite", "ofline"], "did you mean 'offline'"),
        (["eval", "smollm2-135m", "--ppl", "news", "--shots", "a,b"], "--shots takes comma-separated integers"),
        (["eval", "smollm2-135m", "--ppl", "news", "--limit", "-1"], "--limit must be an integer 0.."),
        (["eval", "smollm2-135m", "--ppl", "news", "--max-windows", "-5"], "--max-windows must be"),
        (["eval", "smollm2-135m", "--ppl", "news", "--judge", "hf:x"], "go together"),
        (["eval", "org/name with space", "--ppl", "news"], "hub id like org/name"),
        (["eval", "smollm2-135m", "--ppl", "news", "--head", "int8"], "--head int8 needs --backend packed"),
        (["eval", "smollm2-135m", "--ppl", "news", "--backend", "packed", "--head", "int4"], "--head"),
        (["bench", "smollm2-135m", "--batch-sizes", "0"], "--batch-sizes must be an integer 1.."),
        (["bench", "smollm2-135m", "--gen-len", "1"], "--gen-len must be an integer 2.."),
        (["export", "nowhere", "--format", "gptq", "--out", "o"], "SRC 'nowhere': no such directory"),
    ],
)
def test_other_command_options(cli, args, needle):
    code, _, err = cli(*args)
    assert code == 2 and needle in one_line_error(err)
    assert not any(cli.cwd.iterdir())


def test_export_format_typo(cli, tmp_path):
    src = tmp_path / "q"
    src.mkdir()
    (src / "quantshift.json").write_text("{}")
    code, _, err = cli("export", str(src), "--format", "gptqq", "--out", str(tmp_path / "o"))
    assert code == 2 and "did you mean 'gptq'" in one_line_error(err)


# ---------------------------------------------------------------- studies

STUDY = """name: tiny
models: [smollm2-135m]
methods:
  - {method: rtn, wbits: [4], group_size: 64}
calibration: {sources: [wikipedia], n: 2, seqlen: 64}
evaluation: {ppl: [news], ppl_windows: 2}
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("cmd", ["run", "check"])
def test_study_unknown_source(cli, tmp_path, cmd):
    study = write(tmp_path, STUDY.replace("sources: [wikipedia]", "sources: [wikipedia, newz]"))
    code, _, err = cli(cmd, str(study))
    line = one_line_error(err)
    assert code == 2 and "unknown source 'newz'" in line and "did you mean 'news'" in line
    assert not any(cli.cwd.iterdir())  # no runs/ directory


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ("calibration:", "calibraton:", "unknown key 'calibraton' (did you mean 'calibration'?)"),
        ("ppl_windows: 2", "ppl_window: 2", "unknown key 'ppl_window' (did you mean 'ppl_windows'?)"),
        ("{method: rtn,", "{method: rtm,", "unknown method 'rtm' (did you mean 'rtn'?)"),
        ("group_size: 64}", "group_size: -7}", "group_size must be -1"),
        ("group_size: 64}", "group_size: 64, options: {dmp: 1}}", "unknown key 'dmp'"),
        ("n: 2,", "n: 0,", "calibration.n: n must be an integer 1.."),
        ("[smollm2-135m]", "[smollm2-136m]", "did you mean 'smollm2-135m'"),
        ("name: tiny", "name: ../escape", "must be a plain directory name"),
        ("ppl: [news]", "ppl: [news], shots: []", "shots is empty"),
        ("ppl: [news]", "ppl: [news], suite: ofline", "did you mean 'offline'"),
    ],
)
def test_study_values(old, new, needle, tmp_path):
    assert old in STUDY
    with pytest.raises(InvalidInput) as info:
        validate.check_study_file(write(tmp_path, STUDY.replace(old, new)))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_study_calibration_too_short(tmp_path):
    text = STUDY.replace("method: rtn", "method: gptq").replace(
        "[wikipedia], n: 2, seqlen: 64", "[news], n: 200, seqlen: 4096"
    )
    with pytest.raises(InvalidInput, match="'news' has [0-9]+ (bytes of )?calibration (tokens|text).*200"):
        validate.check_study_file(write(tmp_path, text))
    validate.check_study_file(write(tmp_path, text.replace("seqlen: 4096", "seqlen: 64")))


def test_study_with_nothing_to_evaluate(tmp_path):
    text = STUDY.replace("evaluation: {ppl: [news], ppl_windows: 2}", "evaluation: {ppl_windows: 2}")
    with pytest.raises(InvalidInput, match="nothing to evaluate"):
        validate.check_study_file(write(tmp_path, text))


def test_study_examples_mode_needs_enough_documents(tmp_path):
    docs = tmp_path / "few.txt"
    docs.write_text("\n\n".join(f"document {i} " * 20 for i in range(10)))  # 8 calibration documents
    text = STUDY.replace("method: rtn", "method: gptq").replace(
        "sources: [wikipedia], n: 2, seqlen: 64", f"sources: [{docs}], n: 9, seqlen: 64, mode: examples"
    )
    with pytest.raises(InvalidInput, match="has 8 calibration examples; asked for n = 9"):
        validate.check_study_file(write(tmp_path, text))
    validate.check_study_file(write(tmp_path, text.replace("n: 9", "n: 8")))


def test_windows_longer_than_the_model_context(cli, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "llama", "max_position_embeddings": 256, "num_hidden_layers": 2, '
        '"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, '
        '"vocab_size": 100}'
    )  # a config the memory plan can read
    code, _, err = cli("quantize", str(model), "--method", "rtn", "--seqlen", "512", "--out", str(tmp_path / "o"))
    assert code == 2 and "--seqlen 512 is longer than" in one_line_error(err) and "context of 256" in err
    code, _, err = cli("eval", str(model), "--ppl", "news", "--seqlen", "300")
    assert code == 2 and "context of 256" in one_line_error(err)
    code, _, err = cli("bench", str(model), "--prompt-len", "300")
    assert code == 2 and "context of 256" in one_line_error(err)
    with pytest.raises(ModelLoaded):  # within the context: reaches the loader
        cli("quantize", str(model), "--method", "rtn", "--seqlen", "256", "--out", str(tmp_path / "o"))


def test_study_that_is_not_a_mapping(tmp_path):
    with pytest.raises(InvalidInput, match="a study is a mapping"):
        validate.check_study_file(write(tmp_path, "- a\n- b\n"))


def test_check_offline_study_counts_work_without_loading(cli):
    code, out, err = cli("check", str(ROOT / "studies" / "offline-cross-domain.yaml"))
    assert code == 0, err
    assert "quantize works: 13 (0 with every result cached, 13 to run)" in out
    assert "eval units: 56 (0 cached, 56 to run)" in out
    assert "14 distinct models" in out and "estimate with --jobs 1" in out
    assert not any(cli.cwd.iterdir())  # a dry run writes nothing


def test_check_counts_cached_units(cli, tmp_path):
    """A unit whose result is in the cache is counted as cached."""
    from quantshift.studies.cache import Cache
    from quantshift.studies.runner import plan_study
    from quantshift.studies.spec import load_study

    study = write(tmp_path, STUDY)
    plan = plan_study(load_study(study), on_gpu=False)
    cache = Cache(tmp_path / "cache")
    first = plan.works[0]["units"][0]["key"]
    cache.put_json("results", first, {"metric": {}})
    code, out, err = cli("check", str(study), "--cache", str(tmp_path / "cache"), "--device", "cpu")
    assert code == 0, err
    assert "eval units: 2 (1 cached, 1 to run)" in out


def test_check_recipe_lists_resolved_stages(cli, tmp_path):
    rec = write(tmp_path, "stages:\n  - smoothquant: {alpha: 0.8, quantize: false}\n  - gptq: {wbits: 4}\n", "r.yaml")
    code, out, err = cli("check", str(rec))
    assert code == 0, err
    assert "recipe: valid, 2 stages" in out
    assert "stage 1: gptq (quantize, calibrated)" in out and "group_size=128" in out and "damp=0.01" in out
    code, _, err = cli("check", str(write(tmp_path, "stages:\n  - gptq: {wbit: 4}\n", "bad.yaml")))
    assert code == 2 and "did you mean 'wbits'" in one_line_error(err)


def test_check_prints_memory_plans_and_refuses_bad_caps(cli, tmp_path):
    code, out, err = cli("check", str(ROOT / "studies" / "offline-cross-domain.yaml"), "--max-memory", "cpu=64GiB")
    assert code == 0, err
    assert "memory plan for smollm2-135m" in out and "quantize  in memory" in out and "host cap 64.0 GiB" in out
    code, out, err = cli("check", str(ROOT / "studies" / "offline-cross-domain.yaml"), "--max-memory", "cpu=100MB")
    assert code == 0 and "memory plan for smollm2-135m: does not fit: quantize needs" in out, err
    rec = write(tmp_path, "stages:\n  - gptq: {wbits: 4}\n", "r.yaml")
    code, out, err = cli("check", str(rec), "--model", "smollm2-135m", "--max-memory", "cpu=8GiB")
    assert code == 0 and "memory plan for smollm2-135m" in out and "evaluate" in out, err
    code, _, err = cli("check", str(rec), "--max-memory", "cpu=8 gigs")
    assert code == 2 and "cannot read memory size '8 gigs'" in one_line_error(err)


def test_check_file_neither_recipe_nor_study(cli, tmp_path):
    code, _, err = cli("check", str(write(tmp_path, "modles: [x]\n")))
    assert code == 2 and "did you mean 'models'" in one_line_error(err)


# ---------------------------------------------------------------- pure helpers


def test_model_names():
    validate.check_model_name("MODEL", "smollm2-135m")
    validate.check_model_name("MODEL", "meta-llama/Llama-2-7b-hf")  # hub ids: accepted, checked on load
    for bad, needle in [
        ("smolm2-135m", "did you mean 'smollm2-135m'"),
        ("./nope", "does not exist"),
        ("a/b/c", "does not exist"),
        ("org/na me", "hub id"),
        ("org--x/y", "hub id"),
        ("", "unknown model"),
    ]:
        with pytest.raises(InvalidInput, match=needle):
            validate.check_model_name("MODEL", bad)


def test_calibration_budget_is_sound():
    """Rejects only what surely fails; a small request on a large source passes with a note."""
    assert "ample" in validate.check_calib_budget("--calib", "wikipedia", 4, 128, model=None)
    with pytest.raises(InvalidInput, match="bytes of calibration text"):
        validate.check_calib_budget("--calib", "news", 10**6, 512, model=None)
    assert "not checked" in validate.check_calib_budget("--calib", "hf:some/dataset", 10**6, 512)


def test_a_tilde_name_of_no_user_is_a_missing_path_not_a_crash(tmp_path):
    """Found by the quantize fuzzer: "~name" with no such user made pathlib raise RuntimeError
    from inside a check; it is a path that does not exist, said in one line."""
    with pytest.raises(InvalidInput, match="does not exist"):
        validate.check_model_name("MODEL", "~no-such-user-here/model")
