"""The public Python API: every calibration and recipe form, errors before any model loads, the
same numbers and files as the CLI, export and reload round trips, and the README's example."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _tiny, has_real_models, logits, random_calib, toy_tokenizer

from quantshift import CalibSet, QuantizationResult, Recipe, evaluate, export, load, quantize, run_study, save
from quantshift.errors import ConfigError, DataError, QuantshiftError
from quantshift.models.precision import resolve_precision
from quantshift.pipeline import quantize_model
from quantshift.recipes import make_stage

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
TEXT = "The river bends slowly past the old mill, where farmers bring grain each autumn. "
TEXTS = [f"{i} " + TEXT * 3 for i in range(12)]  # 12 x ~250 characters = tokens of the toy tokenizer
GPTQ = {"wbits": 4, "group_size": 32}


def _q(calib=None, recipe="gptq", kind="llama", **kw):
    opts = {**GPTQ, **kw} if isinstance(recipe, str) and not recipe.endswith(".yaml") else kw
    return quantize(_tiny(kind), recipe, calib, tokenizer=toy_tokenizer(), progress=False, device="cpu", **opts)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def qs_cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "quantshift.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def test_package_root_exports_the_verbs():
    import quantshift.pipeline  # noqa: F401  the quantization pipeline's module: no submodule shadows a verb

    assert quantshift.quantize is quantize and callable(quantshift.quantize)
    assert {"quantize", "evaluate", "save", "load", "export", "run_study", "QuantizationResult"} <= set(
        quantshift.__all__
    )
    assert all(hasattr(quantshift, name) for name in quantshift.__all__)


# ---- calibration forms -------------------------------------------------------------------------


def test_token_windows_give_what_the_engine_gives_on_the_same_ids():
    """calib as [n, seqlen] ids is exactly the internal pipeline on a CalibSet of those ids."""
    cal = random_calib(n=4, seqlen=32)
    res = _q(cal.input_ids)
    ref = _tiny("llama")
    from quantshift.models.load import LoadedModel

    loaded = LoadedModel.from_hf(ref, toy_tokenizer(), precision=resolve_precision("auto", "cpu"))
    quantize_model(loaded, res.recipe, cal, device="cpu", progress=False)
    assert _same(_weights(res.model), _weights(ref))
    assert res.calibration["source"] == "tokens" and res.calibration["sha256"] == cal.manifest.sha256
    # the CalibSet itself: its manifest is recorded unchanged
    res2 = _q(cal)
    assert _same(_weights(res2.model), _weights(ref)) and res2.calibration == cal.manifest.to_dict()


def test_texts_stream_and_source_calibration():
    a, b = _q(TEXTS, nsamples=4, seqlen=32), _q(TEXTS, nsamples=4, seqlen=32)
    assert a.calibration["source"] == "texts[12]" and (a.calibration["n"], a.calibration["seqlen"]) == (4, 32)
    assert a.calibration["sha256"] == b.calibration["sha256"]  # seeded
    assert _q(TEXTS, nsamples=4, seqlen=32, seed=7).calibration["sha256"] != a.calibration["sha256"]
    # a 1-D token stream is cut into windows like a text's tokens
    stream = torch.tensor(toy_tokenizer()("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"])
    s = _q(stream, nsamples=4, seqlen=32)
    assert s.calibration["sha256"] == a.calibration["sha256"] and _same(_weights(s.model), _weights(a.model))
    news = _q("news", nsamples=2, seqlen=32)
    assert news.calibration["source"] == "news" and news.calibration["split"] == "calib"
    assert not _same(_weights(news.model), _weights(a.model))


def test_calibration_errors_are_one_line():
    with pytest.raises(DataError, match=r"calib \(a list of 1 texts\) has \d+ tokens .* asked for 64 x 32") as err:
        _q(TEXTS[:1], nsamples=64, seqlen=32)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs calibration data: pass calib="):
        _q(None)
    with pytest.raises(ConfigError, match="holds 8 x 32 token windows; nsamples=4"):
        _q(random_calib(n=8, seqlen=32), nsamples=4)
    with pytest.raises(ConfigError, match="calibration on texts needs the model's tokenizer"):
        quantize(_tiny("llama"), "gptq", TEXTS, nsamples=2, seqlen=32, progress=False)


# ---- recipe forms ------------------------------------------------------------------------------


def test_recipe_forms_agree(tmp_path):
    stage = {"rtn": {"wbits": 3, "group_size": 32, "sym": True}}
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("stages:\n  - rtn: {wbits: 3, group_size: 32, sym: true}\n")
    forms = [
        ("rtn", {"wbits": 3, "group_size": 32, "sym": True}),
        ({"stages": [stage]}, {}),
        ([stage], {}),
        (str(yaml_path), {}),
        (yaml_path, {}),
        (Recipe((make_stage("rtn", stage["rtn"]),)), {}),
    ]
    before = repr(forms)
    results = [
        quantize(_tiny("llama"), r, tokenizer=toy_tokenizer(), progress=False, device="cpu", **o) for r, o in forms
    ]
    assert repr(forms) == before  # callers' recipes are never changed
    first = results[0]
    assert first.recipe.describe() == "rtn(w3g32)"
    for res in results[1:]:
        assert res.recipe == first.recipe and _same(_weights(res.model), _weights(first.model))
    assert not _same(_weights(first.model), _weights(_tiny("llama")))


def test_method_list_routes_each_option_to_the_stages_that_have_it():
    res = _q(random_calib(n=4, seqlen=32), "smoothquant,gptq", alpha=0.7, quantize=False, act_order=False)
    sq, gq = res.recipe.stages
    assert (sq.method, sq.config.alpha, sq.config.quantize, sq.config.wbits) == ("smoothquant", 0.7, False, 4)
    assert (gq.method, gq.config.act_order, gq.config.group_size) == ("gptq", False, 32)


@pytest.mark.parametrize(
    "recipe,opts,needle",
    [
        ("gptq", {"grup_size": 64}, r"unknown key 'grup_size' \(allowed: .*group_size"),
        ("smoothquant,gptq", {"alpah": 0.5}, r"unknown key 'alpah'"),
        ("gptqq", {}, r"unknown method 'gptqq'; allowed: .*gptq"),
        ("rtn", {"wbits": 9}, "wbits must be 2..8"),
        ({"stages": [{"gptq": {"wbits": 4, "grup_size": 64}}]}, {}, r"unknown key 'grup_size'"),
        (Recipe((make_stage("rtn", {}),)), {"wbits": 3}, r"method options \(wbits\) go with a method name"),
        ("rtn", {"propagate": "float"}, "--propagate must be quantized or fp"),
        ("rtn", {"activations": "gpu"}, "--activations must be auto, device or offload"),
        ("rtn", {"group_size": -5}, "group_size"),
        ("rtn", {"targets": ["q_proj("]}, r"targets: invalid regex 'q_proj\('"),
        ("rtn", {"batch_size": 0}, "batch_size must be"),
        ("rtn", {"nsamples": 0}, "nsamples must be"),
        ("rtn", {"dtype": "fp13"}, "dtype"),
    ],
)
def test_bad_options_fail_before_the_model_loads(recipe, opts, needle):
    # the model name does not exist: an error about the options proves they were checked first
    with pytest.raises(ConfigError, match=needle) as err:
        quantize("no-such-model", recipe, progress=False, **opts)
    assert "\n" not in str(err.value)


def test_yaml_recipe_typo_names_the_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - gptq: {wbits: 4, grup_size: 64}\n")
    with pytest.raises(ConfigError, match=r"r.yaml stage 0 \(gptq\): unknown key 'grup_size'"):
        quantize("no-such-model", p)


# ---- models and precision ----------------------------------------------------------------------


def test_in_memory_model_is_quantized_in_place_in_the_resolved_precision():
    model = _tiny("llama").to(torch.bfloat16)
    res = quantize(model, "rtn", tokenizer=toy_tokenizer(), wbits=4, group_size=32, device="cpu", progress=False)
    auto = resolve_precision("auto", "cpu")
    assert res.model is model and res.precision == res.report["precision"] == auto.name and res.device == "cpu"
    assert next(model.parameters()).dtype == auto.weights  # converted as the CLI would load it
    res = quantize(_tiny("llama"), "rtn", tokenizer=toy_tokenizer(), dtype="bfloat16", device="cpu", progress=False)
    assert res.precision == "bfloat16" and next(res.model.parameters()).dtype == torch.bfloat16
    assert "rtn(w4g128)" in repr(res) and "bfloat16" in repr(res)
    res.evaluate(ppl="news", seqlen=32, max_windows=1, dtype="float32", device="cpu", progress=False)
    assert res.precision == "float32" and next(res.model.parameters()).dtype == torch.float32  # kept in step


def test_tokenizer_goes_only_with_an_in_memory_model(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer= goes with an in-memory"):
        quantize("smollm2-135m", "rtn", tokenizer=toy_tokenizer())
    res = quantize(_tiny("llama"), "rtn", progress=False, device="cpu")  # RTN needs no tokenizer ...
    with pytest.raises(ConfigError, match="saving needs the model's tokenizer"):
        res.save(tmp_path / "q")  # ... but a saved directory holds one
    assert not (tmp_path / "q").exists()


# ---- the CLI is the API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("api") / "tiny-llama"
    save(_tiny("llama"), d, tokenizer=toy_tokenizer())
    return d


@pytest.fixture
def one_thread():
    """The CLI subprocesses run at one thread (OMP_NUM_THREADS=1): so does this process, so that
    float summation order, and with it every byte, is the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cli_quantize_and_eval_equal_the_api(tiny_dir, tmp_path, one_thread):
    args = [
        "--method",
        "gptq",
        "--wbits",
        "4",
        "--group-size",
        "32",
        "--calib",
        "news",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--device",
        "cpu",
        "--quiet",
    ]
    r = qs_cli("quantize", str(tiny_dir), *args, "--out", str(tmp_path / "cli"))
    assert r.returncode == 0, r.stderr
    res = quantize(str(tiny_dir), "gptq", "news", nsamples=4, seqlen=32, device="cpu", progress=False, **GPTQ)
    api_dir = res.save(tmp_path / "api")
    assert res.path == api_dir
    cli_info, api_info = (json.loads((d / "quantshift.json").read_text()) for d in (tmp_path / "cli", api_dir))
    assert cli_info["files"] == api_info["files"]  # byte-identical tensors
    assert cli_info["calibration"] == api_info["calibration"] == res.calibration
    assert cli_info["base_model"] == api_info["base_model"] == str(tiny_dir)

    ev = ["--ppl", "news", "--seqlen", "32", "--max-windows", "3", "--device", "cpu", "--quiet"]
    r = qs_cli("eval", str(tmp_path / "cli"), *ev, "--json", str(tmp_path / "cli.json"))
    assert r.returncode == 0, r.stderr
    cli_json = json.loads((tmp_path / "cli.json").read_text())
    kw = dict(ppl="news", seqlen=32, max_windows=3, device="cpu", progress=False)
    from_dir = evaluate(api_dir, json_out=tmp_path / "api.json", **kw)
    in_memory = res.evaluate(**kw)
    assert cli_json["metrics"] == from_dir == in_memory  # a reload reproduces the fake-quant model exactly
    assert set(from_dir["ppl:news"]) >= {"ppl", "tokens", "windows", "seqlen"} and from_dir["ppl:news"]["windows"] == 3
    api_json = json.loads((tmp_path / "api.json").read_text())
    assert api_json.keys() == cli_json.keys() and api_json["quantization"] == cli_json["quantization"]
    assert (tmp_path / "api.samples.jsonl").is_file()


def test_evaluate_errors_before_loading():
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate("no-such-model")
    with pytest.raises(ConfigError, match="--shots must be >= 0"):
        evaluate("no-such-model", ppl="news", shots=-1)
    with pytest.raises(ConfigError, match="unknown suite"):
        evaluate("no-such-model", suite="no-such-suite")


# ---- save, load, export --------------------------------------------------------------------------


def test_export_save_load_round_trips(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    res = _q(random_calib(n=4, seqlen=32), sym=True)
    ref = logits(res.model, IDS)
    ct = res.export(tmp_path / "ct", dtype="float32")  # never saved: goes through a temporary directory
    assert (
        res.path is None
        and json.loads((ct / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    )
    hf = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()  # transformers' own loader
    assert float((logits(hf, IDS) - ref).abs().max() / ref.abs().max()) < 1e-5

    saved = save(res, tmp_path / "q")
    back = load(saved, device="cpu", dtype="float32")
    assert isinstance(back, QuantizationResult) and back.path == saved and back.run is None
    assert back.recipe == res.recipe and back.calibration == res.calibration
    assert back.report["modules"].keys() == res.report["modules"].keys()
    assert torch.equal(logits(back.model, IDS), ref)
    copy = back.save(tmp_path / "copy")  # a loaded result saves by copying its directory
    assert (
        json.loads((copy / "quantshift.json").read_text())["files"]
        == json.loads((saved / "quantshift.json").read_text())["files"]
    )
    g = export(str(copy), tmp_path / "g", format="gptq")
    assert json.loads((g / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"

    model, tok = load(tiny_dir, device="cpu")  # not quantized: the model and its tokenizer
    assert hasattr(tok, "save_pretrained") and not isinstance(model, QuantizationResult)
    with pytest.raises(QuantshiftError, match="export needs a quantized model"):
        export(model, tmp_path / "x")


def test_calibset_is_exported_from_the_root():
    assert CalibSet is type(random_calib())


# ---- studies ----------------------------------------------------------------------------------


def test_run_study_from_a_dict(tmp_path, tiny_dir):
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(f"{i} " + TEXT * 3 for i in range(25)))
    spec = {
        "name": "api-tiny",
        "models": [str(tiny_dir)],
        "methods": [{"method": "rtn", "wbits": [4], "group_size": 32}],
        "calibration": {"sources": [str(text)], "n": 2, "seqlen": 32},
        "evaluation": {"ppl": [str(text)], "ppl_seqlen": 32, "ppl_windows": 2},
        "diagnostics": {"enabled": False},
        "device": "auto",
    }
    before = json.dumps(spec, sort_keys=True)
    lines: list[str] = []
    summary = run_study(
        spec, tmp_path / "run", cache=tmp_path / "cache", device="cpu", progress=False, echo=lines.append
    )
    assert summary["failed"] == 0 and summary["units_computed"] == 2  # fp and rtn, one ppl each
    assert Path(summary["report"]).is_file() and json.dumps(spec, sort_keys=True) == before
    assert json.loads((tmp_path / "run" / "study.json").read_text())["spec"]["device"] == "cpu"
    again = run_study(spec, tmp_path / "run", cache=tmp_path / "cache", device="cpu", progress=False, echo=lines.append)
    assert again["units_computed"] == 0  # the cache answers
    spec["calibration"]["nsamples"] = 2
    with pytest.raises(ConfigError, match="unknown key 'calibration.nsamples'"):
        run_study(spec, tmp_path / "bad")


# ---- the README's example ----------------------------------------------------------------------


def readme_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_found():
    code = readme_example()
    assert "quantize(" in code and ".evaluate(" in code and ".export(" in code
    compile(code, "README.md", "exec")


@pytest.mark.slow
@pytest.mark.skipif(not has_real_models(), reason="bundled model package not installed")
def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    res, ppl = scope["result"], scope["metrics"]["ppl:wikipedia"]
    assert res.calibration["source"] == "texts[5]" and res.calibration["n"] == 8
    assert len(res.report["modules"]) == 30 * 7
    assert ppl["windows"] == 4 and 5 < ppl["ppl"] < 60  # W4 g64 stays near fp (~22 in the README's tables)
    ct = tmp_path / "runs" / "api" / "gptq-w4-ct"
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (tmp_path / "runs" / "api" / "gptq-w4" / "quantshift.json").is_file()
