"""Property-based fuzzing of everything a user types: CLI options, recipe YAML, study YAML.

Property (the first tests): every input either passes validation (the command then reaches its first heavy step,
replaced here by a sentinel: the model loader, task data, the exporter, the study runner) or
fails with exit code 2 and exactly one line `error: ...` on stderr, no traceback; and nothing
is written to the working directory either way. Runs in process (main() with sys.argv), so
each example takes milliseconds; no model is ever loaded.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import quantshift.api as api_mod
import quantshift.bench.commands as bench_cmd
import quantshift.cli as cli_mod
import quantshift.evaluation.run as eval_api
import quantshift.exporters as export_pkg
import quantshift.models.load as load_mod
import quantshift.studies.runner as runner_mod
from quantshift import validate

# QS_FUZZ_EXAMPLES=500 for a deeper run by hand; the suite keeps to 40 per property
FUZZ = settings(
    max_examples=int(os.environ.get("QS_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class Reached(Exception):
    """Validation passed: the command got to the step that would load a model or run work."""


def _stop(*a, **k):
    raise Reached


@contextmanager
def sandbox() -> Iterator[Path]:
    """An empty cwd, heavy steps replaced by the sentinel, lm-eval's task index by a small one."""
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        mp.setattr(load_mod, "load_model", _stop)
        mp.setattr(api_mod, "load_model", _stop)  # the API binds the loader by name
        mp.setattr(bench_cmd, "measure_variant", _stop)  # bench measures in-process or in a child
        mp.setattr(bench_cmd, "_in_child", _stop)
        mp.setattr(eval_api, "preflight", _stop)  # eval: task data loads right before the model
        mp.setattr(export_pkg, "export", _stop)
        mp.setattr(runner_mod, "run_study", _stop)
        mp.setattr("quantshift.threads.use_all_cores", lambda: None)
        names = frozenset({"arc_easy", "hellaswag", "mmlu", "piqa"})
        mp.setattr(validate, "_lm_eval_quick_names", lambda: names)
        mp.setattr(validate, "_lm_eval_all_names", lambda: names)
        yield Path(d)


def invoke(args: list[str]) -> tuple[int | None, str, bool]:
    """(exit code, stderr, reached the sentinel) of `quantshift ARGS`, in an empty sandbox cwd
    that must stay empty."""
    out, err = io.StringIO(), io.StringIO()
    with sandbox() as cwd:
        reached, code = False, 0
        old = sys.argv
        sys.argv = ["quantshift", *args]
        try:
            with redirect_stdout(out), redirect_stderr(err):
                cli_mod.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Reached:
            reached = True
        finally:
            sys.argv = old
        assert not any(cwd.iterdir()), f"{args} wrote {sorted(p.name for p in cwd.iterdir())}"
    return code, err.getvalue(), reached


def assert_clean(args: list[str], ok_codes: tuple[int, ...] = ()) -> None:
    code, err, reached = invoke(args)
    event("passed validation" if reached or code in ok_codes else "rejected")  # --hypothesis-show-statistics
    if reached or code in ok_codes:
        return
    assert code == 2, f"{args}: exit {code}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{args}:\n{err}"


# ---------------------------------------------------------------- building blocks

NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))  # argv cannot hold NUL
TEXT = st.text(NO_NUL, max_size=12)
BAD_NAMES = st.sampled_from(
    [
        "smoothquant+gptq",
        "./nope",
        "a/b/c",
        "ünïcode",
        "",
        "missing.txt",
        "task:boss_*",
        "task:",
        "+",
        "org//x",
        "--",
        "-1",
    ]
)


@st.composite
def typo(draw, word: str) -> str:
    """One edit of a word: delete, double, swap, replace a character, or change case."""
    if not word:
        return draw(TEXT)
    i = draw(st.integers(0, len(word) - 1))
    op = draw(st.sampled_from(["delete", "double", "swap", "replace", "case"]))
    if op == "delete":
        return word[:i] + word[i + 1 :]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    if op == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == "case":
        return word.upper()
    return word[:i] + draw(st.characters(min_codepoint=33, max_codepoint=0x2FF)) + word[i + 1 :]


def name_like(valid: list[str]) -> st.SearchStrategy[str]:
    """Mostly valid names, else their typos or anything else."""
    good = st.sampled_from(valid)
    return st.one_of(*[good] * 6, good.flatmap(typo), TEXT, BAD_NAMES)


NUMBER = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 64, 128, 513, 2**31, 2**63, -(2**63), 10**30]),
    st.integers(-(10**6), 10**6),
).map(str)
NUMBER_OR_JUNK = st.one_of(NUMBER, TEXT, st.sampled_from(["", " ", "1e3", "4.5", "nan", "٣", "0x10"]))


def value(good: list) -> st.SearchStrategy[str]:
    """Mostly a good value of the option, else any number or junk."""
    g = st.sampled_from([str(v) for v in good])
    return st.one_of(*[g] * 6, NUMBER_OR_JUNK)


METHODS = ["rtn", "gptq", "awq", "smoothquant", "spqr", "zeroquant", "quip", "fp8", "kvcache", "gptq,rtn"]
SOURCES = [
    "wikipedia",
    "pydocs",
    "zh-news",
    "wikipedia+pydocs",
    "hf:some/dataset",
    "news",
    "c4",
    "task:movie_sentiment",
]
MODELS = ["smollm2-135m", "gemma3-270m", "org/name"]


@st.composite
def options(draw, spec: dict[str, st.SearchStrategy[str]], flags: tuple[str, ...] = ()) -> list[str]:
    """A random subset of options with random values; now and then an option name misspelt."""
    chosen = draw(st.lists(st.sampled_from(sorted(spec)), max_size=5, unique=True))
    args: list[str] = []
    for opt in chosen:
        name = draw(typo(opt)) if draw(st.integers(0, 19)) == 0 else opt
        args += [name, draw(spec[opt])]
    for flag in flags:
        if draw(st.booleans()):
            args.append(flag)
    return args


# ---------------------------------------------------------------- CLI options

QUANTIZE = {
    "--wbits": value([2, 3, 4, 8, 16]),
    "--abits": value([4, 8, 16]),
    "--group-size": value([-1, 0, 32, 64, 128]),
    "--calib": name_like(SOURCES),
    "--nsamples": value([1, 4, 16]),
    "--seqlen": value([16, 128, 512]),
    "--seed": value([0, 42]),
    "--device": name_like(["auto", "cpu"]),
    "--dtype": name_like(["auto", "float32", "bfloat16"]),
    "--batch-size": value([1, 8]),
    "--propagate": name_like(["quantized", "fp"]),
    "--activations": name_like(["auto", "device", "offload"]),
    "--data-dir": name_like(["."]),
    "--stats-cache": name_like(["stats"]),
}


@FUZZ
@given(model=name_like(MODELS), method=name_like(METHODS), opts=options(QUANTIZE, ("--sym", "--overwrite", "--quiet")))
def test_fuzz_quantize_options(model, method, opts):
    assert_clean(["quantize", model, "--method", method, "--out", "out", *opts])


EVAL = {
    "--ppl": name_like(["wikipedia", "news", "pydocs,news"]),
    "--tasks": name_like(["movie_sentiment", "arc_easy", "hellaswag,mmlu_dev"]),
    "--suite": name_like(["offline", "ppl", "boss"]),
    "--shots": value(["0", "0,5"]),
    "--limit": value([0, 10]),
    "--seqlen": value([128, 512]),
    "--max-windows": value([0, 4]),
    "--batch-size": value([1, 4]),
    "--seed": value([0, 1234]),
    "--device": name_like(["auto", "cpu"]),
    "--dtype": name_like(["auto", "float32"]),
    "--json": name_like(["m.json"]),
    "--mt-bench": TEXT,
    "--judge": name_like(["hf:org/judge", "openai:gpt@http://x"]),
    "--max-new-tokens": value([16, 256]),
    "--data-dir": name_like(["."]),
}


@FUZZ
@given(model=name_like(MODELS), opts=options(EVAL))
def test_fuzz_eval_options(model, opts):
    assert_clean(["eval", model, *opts])


BENCH = {
    "--batch-sizes": value(["1,8,32", "4", "1,,2"]),
    "--prompt-len": value([1, 128]),
    "--gen-len": value([2, 32]),
    "--repeats": value([1, 3]),
    "--device": name_like(["auto", "cpu"]),
    "--dtype": name_like(["auto", "float16"]),
    "--json": name_like(["b.json"]),
}
EXPORT = {"--dtype": name_like(["auto", "bfloat16"]), "--gptq-version": value([1, 2])}


@FUZZ
@given(model=name_like(MODELS), opts=options(BENCH))
def test_fuzz_bench_options(model, opts):
    assert_clean(["bench", model, *opts])


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory) -> Path:
    """Looks like a quantized directory to validation (it has quantshift.json)."""
    d = tmp_path_factory.mktemp("q") / "model"
    d.mkdir()
    (d / "quantshift.json").write_text("{}")
    return d


@FUZZ
@given(
    src=st.one_of(st.just("QDIR"), st.just("QDIR"), TEXT),
    opts=options(EXPORT, ("--overwrite", "--allow-unservable")),
    fmt=name_like(["compressed-tensors", "gptq", "fp8"]),
)
def test_fuzz_export_options(quantized_dir, src, opts, fmt):
    assert_clean(["export", str(quantized_dir) if src == "QDIR" else src, "--format", fmt, "--out", "out", *opts])


@FUZZ
@given(
    args=st.lists(
        st.one_of(
            TEXT,
            st.sampled_from(
                ["quantize", "eval", "run", "check", "--out", "--wbits", "--help", "list", "methods", "--debug"]
            ),
        ),
        max_size=6,
    )
)
def test_fuzz_raw_argv(args):
    """Arbitrary words: help and listings exit 0, the rest is a clean exit 2 or reaches the sentinel."""
    if "--debug" in args:  # --debug deliberately shows tracebacks
        return
    if not args:  # bare `quantshift`: the help on stdout, exit 2 (click's convention), no error line
        code, err, _ = invoke(args)
        assert code == 2 and not err.strip()
        return
    assert_clean(args, ok_codes=(0,))


# ---------------------------------------------------------------- YAML files

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 16, 64, 128, 10**9, -(10**9), 0.5, -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=15),
    st.sampled_from(["", "wikipedia", "news", "gptq", "auto", "cuda:0", "../x", "ünï", "a" * 300, "(", "x\0y"]),
    st.lists(st.integers(-5, 300), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _paths(data, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


def _get(data, path):
    for p in path:
        data = data[p]
    return data


@st.composite
def mutated(draw, base) -> object:
    """`base` with a few random edits: a key misspelt, added or deleted, a value replaced by junk."""
    import copy

    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 2))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        if not path:
            if draw(st.integers(0, 9)) == 0:
                data = draw(JUNK)  # the whole document is not a mapping / list
            continue
        parent, last = _get(data, path[:-1]), path[-1]
        op = draw(st.sampled_from(["typo", "junk", "junk", "delete", "add"]))
        if op == "typo" and isinstance(parent, dict):
            parent[draw(typo(str(last)))] = parent.pop(last)
        elif op == "junk":
            parent[last] = draw(JUNK)
        elif op == "delete" and isinstance(parent, dict):
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(JUNK)
    return data


def yaml_text(data) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


RAW_YAML = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        ["stages: [", "{a: b", ":\n  - ]", "\t- x", "- - - -", "[" * 200, "&a [*a]", "!!python/object:os.system x"]
    ),
)
RECIPE = {
    "stages": [
        {"smoothquant": {"alpha": 0.8, "quantize": False}},
        {"gptq": {"wbits": 4, "group_size": 128, "overrides": [{"pattern": "down_proj", "wbits": 8}]}},
    ]
}
STUDY = {
    "name": "fuzz",
    "models": ["smollm2-135m"],
    "methods": [
        {"method": "rtn", "wbits": [4], "group_size": 64},
        {"method": "gptq", "wbits": [3, 4], "options": {"damp": 0.01}},
        {"name": "sq", "recipe": [{"smoothquant": {"alpha": 0.5}}, {"rtn": {"wbits": 8}}]},
    ],
    "calibration": {"sources": ["wikipedia", "pydocs"], "n": 4, "seqlen": 128, "seeds": [1, 2]},
    "evaluation": {"ppl": ["news"], "ppl_windows": 2, "tasks": ["movie_sentiment"], "shots": [0], "limit": 5},
    "diagnostics": {"enabled": False},
    "device": "cpu",
}


@contextmanager
def yaml_file(content: str | bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "file.yaml"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        yield p


def test_base_documents_are_valid():
    """The fuzzers mutate valid documents: they must start valid, or every example is a reject."""
    assert validate.check_recipe_data(RECIPE)
    with yaml_file(yaml_text(STUDY)) as p:
        assert validate.check_study_file(p).name == "fuzz"


@FUZZ
@given(doc=st.one_of(mutated(RECIPE).map(yaml_text), RAW_YAML, st.binary(max_size=40)))
def test_fuzz_recipe_yaml(doc):
    with yaml_file(doc) as p:
        assert_clean(["check", str(p)], ok_codes=(0,))
        assert_clean(["quantize", "smollm2-135m", "--recipe", str(p), "--out", "out"])


@FUZZ
@given(doc=st.one_of(mutated(STUDY).map(yaml_text), RAW_YAML))
def test_fuzz_study_yaml(doc):
    with yaml_file(doc) as p:
        assert_clean(["run", str(p), "--out", "out"])
        assert_clean(["check", str(p), "--cache", "cache"], ok_codes=(0,))


# ---------------------------------------------------------------- known verdicts
# The properties above pass whether an input is accepted or rejected. These draw inputs whose
# verdict is known: a valid command or document with a few edits, each edit known to keep it
# valid or to break it. A broken input must be rejected with a line naming (one of) the broken
# options; an unbroken one must reach the sentinel.

# option -> (values that keep the command valid, values that break it, what the error names)
QUANTIZE_RULES: dict[str, tuple[list[str], list[str], str]] = {
    "--wbits": (["2", "3", "4", "5", "8", "16"], ["0", "1", "9", "17", "-3", "four"], "--wbits"),
    "--group-size": (["-1", "32", "48", "128"], ["-5", "-2", "x"], "--group-size"),
    "--nsamples": (["1", "4", "128"], ["0", "-1", "1.5"], "--nsamples"),
    "--seqlen": (["8", "128", "512"], ["0", "1"], "--seqlen"),
    "--calib": (["wikipedia", "news", "wikipedia+pydocs"], ["nope", "wikipedai"], "--calib"),
    "--propagate": (["quantized", "fp"], ["sideways", ""], "--propagate"),
    "--dtype": (["auto", "float32", "bfloat16"], ["float33", "int4"], "--dtype"),
    "--batch-size": (["1", "8"], ["0", "-4"], "--batch-size"),
    "--device": (["auto", "cpu"], ["tpu", "cuda:x"], "--device"),
}
# method -> {option: (values valid with it, the words its error uses)} overriding the table above
METHOD_RULES: dict[str, dict[str, tuple[list[str], tuple[str, ...]]]] = {
    "quip": {"--wbits": (["2", "3", "4", "16"], ("--wbits", "QuIP"))},
    "fp8": {"--wbits": (["8", "16"], ("--wbits", "fp8")), "--group-size": ([], ("group_size", "--group-size"))},
    "spqr": {"--group-size": (["32", "48", "128"], ("group_size", "--group-size", "SpQR"))},
}


@st.composite
def quantize_with_verdict(draw) -> tuple[list[str], list[tuple[str, ...]]]:
    """(argv, the error words of each broken option: empty when the command is valid)."""
    method = draw(st.sampled_from(["rtn", "gptq", "awq", "zeroquant", "spqr", "quip", "fp8", "gptq,rtn", "gtpq"]))
    broken: list[tuple[str, ...]] = [("--method",)] if method == "gtpq" else []
    args = ["quantize", "smollm2-135m", "--method", method, "--out", "out"]
    for opt in draw(st.lists(st.sampled_from(sorted(QUANTIZE_RULES)), max_size=3, unique=True)):
        good, bad, word = QUANTIZE_RULES[opt]
        override = METHOD_RULES.get(method, {}).get(opt)
        candidates = sorted(set(good + bad))
        val = draw(st.sampled_from(candidates))
        if override is not None and val not in override[0]:
            broken.append(override[1] + (word,))
        elif val in bad:
            broken.append((word,))
        args += [opt, val]
    return args, broken


def assert_verdict(args: list[str], broken: list[tuple[str, ...]]) -> None:
    code, err, reached = invoke(args)
    if not broken:
        assert reached, f"a valid input was rejected: {args}\n{err}"
        return
    assert not reached, f"an invalid input was accepted: {args} (broken: {broken})"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{args}:\n{err}"
    assert any(w in lines[0] for words in broken for w in words), (
        f"{args}: the error names none of {broken}: {lines[0]}"
    )


@FUZZ
@given(case=quantize_with_verdict())
def test_fuzz_quantize_verdicts(case):
    assert_verdict(*case)


# (path in the document, value that keeps it valid or breaks it, valid?, what the error names)
STUDY_EDITS: list[tuple[tuple, object, bool, str]] = [
    (("calibration", "n"), 8, True, ""),
    (("calibration", "n"), 0, False, "n must"),
    (("calibration", "seqlen"), 256, True, ""),
    (("calibration", "seqlen"), 1, False, "seqlen"),
    (("calibration", "seeds"), [3], True, ""),
    (("calibration", "seeds"), [], False, "seeds"),
    (("calibration", "sources"), ["news"], True, ""),
    (("calibration", "sources"), ["wikipedai"], False, "wikipedai"),
    (("evaluation", "shots"), [0, 3], True, ""),
    (("evaluation", "shots"), [-1], False, "shots"),
    (("evaluation", "limit"), 10, True, ""),
    (("evaluation", "limit"), -2, False, "limit"),
    (("evaluation", "ppl_windows"), 0, True, ""),
    (("evaluation", "ppl_windows"), -1, False, "ppl_windows"),
    (("evaluation", "tasks"), ["movie_sentimnt"], False, "movie_sentimnt"),
    (("models",), ["smollm2-135mm"], False, "smollm2-135mm"),
    (("device",), "tpu", False, "device"),
    (("nmae",), "x", False, "nmae"),
    (("name",), "", False, "name"),
    (("methods", 1, "wbits"), [5], True, ""),
    (("methods", 1, "wbits"), [9], False, "wbits"),
    (("methods", 1, "group_size"), 32, True, ""),
    (("methods", 1, "group_size"), -5, False, "group_size"),
    (("methods", 1, "method"), "gptqq", False, "gptqq"),
    (("methods", 1, "options"), {"damp": 0.1}, True, ""),
    (("methods", 1, "options"), {"damp": -1}, False, "damp"),
    (("methods", 1, "options"), {"dmap": 0.1}, False, "dmap"),
]
RECIPE_EDITS: list[tuple[tuple, object, bool, str]] = [
    (("stages", 1, "gptq", "wbits"), 3, True, ""),
    (("stages", 1, "gptq", "wbits"), 1, False, "wbits"),
    (("stages", 1, "gptq", "damp"), 0.1, True, ""),
    (("stages", 1, "gptq", "damp"), -0.5, False, "damp"),
    (("stages", 1, "gptq", "group_sise"), 64, False, "group_sise"),
    (("stages", 0, "smoothquant", "alpha"), 0.3, True, ""),
    (("stages", 0, "smoothquant", "alpha"), 1.5, False, "alpha"),
    (("stages", 1, "gptq", "block_size"), 0, False, "block_size"),
    (("stages", 1, "gptq", "act_order"), "maybe", False, "act_order"),
]


@st.composite
def edited(draw, base: dict, edits: list) -> tuple[dict, list[tuple[str, ...]]]:
    """`base` with up to three known edits at distinct places, and what the broken ones name."""
    import copy

    doc = copy.deepcopy(base)
    chosen = draw(st.lists(st.sampled_from(edits), max_size=3, unique_by=lambda e: e[0]))
    broken = []
    for path, val, ok, word in chosen:
        parent = _get(doc, path[:-1])
        parent[path[-1]] = copy.deepcopy(val)
        if not ok:
            broken.append((word,))
    return doc, broken


@FUZZ
@given(case=edited(STUDY, STUDY_EDITS))
def test_fuzz_study_verdicts(case):
    doc, broken = case
    with yaml_file(yaml_text(doc)) as p:
        assert_verdict(["run", str(p), "--out", "out"], broken)


@FUZZ
@given(case=edited(RECIPE, RECIPE_EDITS))
def test_fuzz_recipe_verdicts(case):
    doc, broken = case
    with yaml_file(yaml_text(doc)) as p:
        assert_verdict(["quantize", "smollm2-135m", "--recipe", str(p), "--out", "out"], broken)


def test_the_api_rejects_every_input_the_cli_rejects_before_loading(monkeypatch):
    """Every broken value of QUANTIZE_RULES (and each method's own rules), given to
    quantshift.quantize, raises a one-line ConfigError before the model loader is called; every
    value the CLI accepts reaches it."""
    from quantshift import quantize
    from quantshift.errors import ConfigError

    monkeypatch.setattr(load_mod, "load_model", _stop)
    monkeypatch.setattr(api_mod, "load_model", _stop)
    monkeypatch.setattr("quantshift.threads.use_all_cores", lambda: None)

    def typed(text: str):
        try:
            return int(text)
        except ValueError:
            return text

    cases = [("gptq", opt, v, False) for opt, (_good, bad, _w) in QUANTIZE_RULES.items() for v in bad]
    cases += [("gptq", opt, v, True) for opt, (good, _bad, _w) in QUANTIZE_RULES.items() for v in good]
    cases += [
        (m, opt, v, v in ok)
        for m, rules in METHOD_RULES.items()
        for opt, (ok, _w) in rules.items()
        for v in QUANTIZE_RULES[opt][0]
    ]
    for method, opt, v, valid in cases:
        kwargs = {"calib": "wikipedia", opt[2:].replace("-", "_"): typed(v)}  # the API has no default calib
        try:
            quantize("smollm2-135m", method, out=None, progress=False, **kwargs)
        except Reached:
            assert valid, f"quantize({method!r}, {kwargs}) reached the loader; the CLI rejects it"
        except ConfigError as err:
            assert not valid, f"quantize({method!r}, {kwargs}) was rejected; the CLI accepts it: {err}"
            assert "\n" not in str(err)
        else:
            raise AssertionError(f"quantize({method!r}, {kwargs}) neither loaded nor failed")
