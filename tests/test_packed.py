"""Real low-bit inference (quant.inference, quant.int8linear): kernel choice and fallback, packed
models against the fake-quant models they replace, packed sizes, the bench report.

Tolerances, stated once:
- one Int8Linear vs fake-quant F.linear: 1e-5 relative (the integer sum is exact; only float32
  rounding of the reference GEMM differs);
- whole tiny models (2 blocks, planted outliers) in float32: W8A8 logits within 5% of the
  largest logit (a float32 rounding difference upstream can flip an activation code by one
  step), W4 (int4 kernel in bf16) within 4x the error bf16 autocast alone causes; greedy
  tokens agree on >= 90% of positions;
- perplexity: packed within 1% of fake-quant.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import loaded_tiny, logits

from quantshift.evaluation.perplexity import window_nll
from quantshift.models import capability
from quantshift.models.load import load_model
from quantshift.pipeline import quantize_model, save
from quantshift.quant import int8linear
from quantshift.quant.actquant import InputQuantizer, fake_quantize_static
from quantshift.quant.inference import load_packed
from quantshift.quant.int8linear import Int8Linear, activation_codes
from quantshift.quant.primitives import QuantSpec, fake_quantize_activation, quantize_weight
from quantshift.quant.storage import packed_bytes, specs_from_info, specs_from_modules
from quantshift.recipes import recipe_from_cli

A8 = {"spec": QuantSpec(bits=8, group_size=0, symmetric=True).model_dump(), "per_token": True}


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _fake_w8a8(qw, act, x, bias=None):
    """What the fake-quant model computes: input quantizer hook, then F.linear of dequant(W)."""
    q = InputQuantizer(QuantSpec(**act["spec"]), act.get("per_token", True), act.get("static_scale"))
    return torch.nn.functional.linear(q(None, (x,))[0], qw.dequantize().to(x.device), bias)


@pytest.mark.parametrize("sym,gs", [(True, -1), (False, -1), (False, 0)])
def test_int8_linear_matches_fake_quant(sym, gs):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    w[:, :2] *= 8  # outlier columns
    qw = quantize_weight(w, QuantSpec(bits=8, group_size=gs, symmetric=sym))
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1)) * 3
    bias = torch.randn(48)
    lin = Int8Linear(qw, A8, bias)
    assert (lin.zero_corr is None) == sym  # symmetric weights need no zero-point correction
    assert _rel(lin(x), _fake_w8a8(qw, A8, x, bias)) < 1e-5
    assert lin.qweight.dtype == torch.int8 and not any(p.is_floating_point() and p.dim() == 2 for p in lin.buffers())


def test_activation_codes_are_the_fake_quant_grid():
    x = torch.randn(7, 64) * torch.logspace(-2, 2, 7)[:, None]
    for bits in (4, 8):
        spec = QuantSpec(bits=bits, group_size=0, symmetric=True)
        codes, scale = activation_codes(x, spec)
        assert (
            codes.dtype == torch.int8 and int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) < 2 ** (bits - 1)
        )
        assert torch.equal(codes.float() * scale, fake_quantize_activation(x, spec))
    spec8 = QuantSpec(bits=8, group_size=0, symmetric=True)
    codes, scale = activation_codes(x, spec8, static_scale=0.05)
    assert scale.numel() == 1 and int(codes.min()) == -128 and int(codes.max()) == 127  # saturates
    assert torch.equal(codes.float() * scale, fake_quantize_static(x, spec8, 0.05))


def test_int8_kernel_and_fallback_without_int8_units(monkeypatch):
    qw = quantize_weight(torch.randn(32, 64), QuantSpec(bits=8, group_size=-1, symmetric=True))
    x = torch.randn(4, 64)
    assert int8linear.int8_units_missing({"fpu", "avx512_vnni"}) is None and "none of" in (
        int8linear.int8_units_missing({"fpu"}) or ""
    )
    monkeypatch.setattr(capability, "cpu_flags", lambda path="/proc/cpuinfo": {"fpu", "avx2"})  # a CPU without VNNI/AMX
    emulated = Int8Linear(qw, A8)
    assert emulated.kernel == "int8-emulated" and "none of amx_int8" in (emulated.reason or "")
    assert _rel(emulated(x), _fake_w8a8(qw, A8, x)) < 1e-5


def test_grouped_w8a8_is_refused_with_the_reason():
    qw = quantize_weight(torch.randn(32, 64), QuantSpec(bits=8, group_size=32, symmetric=True))
    with pytest.raises(ValueError, match="groups of 32"):
        Int8Linear(qw, A8)


def _quantized_dir(tmp_path, label, **kw):
    lm = loaded_tiny("llama")
    res = quantize_model(lm, recipe_from_cli("rtn", **kw), None, progress=False)
    return save(lm, res, tmp_path / label), lm, res


W8A8 = {"wbits": 8, "abits": 8, "group_size": -1, "sym": True}
W4 = {"wbits": 4, "group_size": 32, "sym": False}


@pytest.mark.parametrize("label,kw,kind", [("w8a8", W8A8, "w8a8:int8-intmm"), ("w4", W4, "w4a16:int4mm-cpu")])
def test_packed_model_logits_match_fake_quant(tmp_path, label, kw, kind):
    if kind.startswith("w8a8") and int8linear.int8_units_missing() is not None:
        kind = "w8a8:int8-emulated"
    q, _, _ = _quantized_dir(tmp_path, label, **kw)
    fake = load_model(str(q), dtype="float32")
    packed = load_model(str(q), dtype="float32", backend="packed")
    assert packed.packing.counts() == {kind: 14}
    # the weight never exists in float: the only 2-D float parameters left are embeddings / lm_head
    floats = [n for n, p in packed.model.named_parameters() if p.dim() == 2]
    assert floats == ["model.embed_tokens.weight"]
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(fake.model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_err = _rel(logits(fake.model, ids), ref)
    got = logits(packed.model, ids)
    assert _rel(got, ref) < (0.05 if label == "w8a8" else 4 * bf16_err)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_packed_perplexity_matches_fake_quant(tmp_path):
    q, _, _ = _quantized_dir(tmp_path, "w4", **W4)
    windows = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(2))
    nll_fake, n = window_nll(load_model(str(q), dtype="float32").model, windows, progress=False)
    nll_packed, _ = window_nll(load_model(str(q), dtype="float32", backend="packed").model, windows, progress=False)
    ppl_fake, ppl_packed = torch.tensor(nll_fake / n).exp(), torch.tensor(nll_packed / n).exp()
    assert abs(float(ppl_packed / ppl_fake) - 1) < 0.01


def test_fallbacks_are_reported(tmp_path):
    # group 48 does not divide into the int4 kernel's groups; W4 with abits 8 has groups: float
    q, _, _ = _quantized_dir(tmp_path, "g48", wbits=4, group_size=48, sym=False)
    model, _, _, report = load_packed(q, torch.float32, "cpu")
    assert report.counts() == {"w4a16:dequant": 14}
    reasons = report.fallbacks()
    assert all("group size 48" in r for r in reasons) and sum(len(n) for n in reasons.values()) == 14
    assert sum("fallback (" in line for line in report.lines()) == len(reasons)
    q2, _, _ = _quantized_dir(tmp_path, "w4a8", wbits=4, abits=8, group_size=32)
    fake = load_model(str(q2), dtype="float32")
    packed = load_model(str(q2), dtype="float32", backend="packed")
    assert packed.packing.counts() == {"float:float": 14}
    assert "groups of 32" in next(iter(packed.packing.fallbacks()))
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    assert _rel(logits(packed.model, ids), logits(fake.model, ids)) < 1e-5  # exactly the fake-quant modules


def test_packed_bytes_of_a_known_model(tmp_path):
    q, lm, res = _quantized_dir(tmp_path, "w4", **W4)
    # tiny llama: per block q 64x64, k/v 32x64, o 64x64, gate/up 160x64, down 64x160; embeddings 128x64 tied
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (160, 64), (160, 64), (64, 160)] * 2
    quant = sum(o * i // 2 + 2 * (o * i // 32) + (o * i // 32) // 2 for o, i in shapes)
    floats = 128 * 64 + 2 * (2 * 64) + 64  # embeddings, two norms per block, final norm
    expect = quant + 2 * floats
    assert packed_bytes(lm.model, specs_from_modules(res.engine.modules)) == expect
    packed = load_model(str(q), dtype="float32", backend="packed")
    assert packed_bytes(packed.model, specs_from_info(packed.quant_info)) == expect
    assert packed_bytes(lm.model, {}) == 2 * sum(p.numel() for p in lm.model.parameters())


def test_bench_report_structure(tmp_path):
    q, _, _ = _quantized_dir(tmp_path, "w4", **W4)
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantshift.cli",
            "bench",
            str(q),
            "--variants",
            "fp32,packed-bf16",
            "--prefill-batches",
            "1",
            "--decode-batches",
            "1,2",
            "--prompt-len",
            "8",
            "--decode-prompt-len",
            "4",
            "--gen-len",
            "3",
            "--repeats",
            "2",
            "--copy-mib",
            "8",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "== packed-bf16 (packed, bfloat16) ==" in r.stdout and "14 w4a16:int4mm-cpu" in r.stdout
    data = json.loads(out.read_text())
    fp, pk = data["variants"]
    assert (fp["variant"], pk["variant"]) == ("fp32", "packed-bf16")
    for v in (fp, pk):
        m = v["metrics"]
        assert {
            "bench:prefill@1",
            "bench:decode@1",
            "bench:decode@2",
            "bench:size",
            "bench:memory",
            "bench:bandwidth",
            "bench:load",
        } <= set(m)
        d = m["bench:decode@2"]
        assert d["tokens"] == 4 and len(d["runs_s"]) == 2 and d["tokens_per_s_min"] <= d["tokens_per_s_max"]
        assert d["bound_tokens_per_s"] > 0 and m["bench:memory"]["peak_rss_bytes"] > 0
    assert fp["metrics"]["bench:decode@1"]["fake_quant"] and not pk["metrics"]["bench:decode@1"]["fake_quant"]
    # packed codes are smaller in memory and per decode step than the fake-quant float weights
    assert pk["metrics"]["bench:size"]["memory_bytes"] < fp["metrics"]["bench:size"]["memory_bytes"] / 3
    assert pk["metrics"]["bench:packing"]["counts"] == {"w4a16:int4mm-cpu": 14}
    assert data["metrics"]["packed-bf16/bench:size"] == pk["metrics"]["bench:size"]


def test_packed_backend_needs_a_quantized_directory(tmp_path):
    from quantshift.errors import ModelError

    lm = loaded_tiny("llama")
    lm.model.save_pretrained(tmp_path / "plain")
    lm.tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelError, match="needs a quantized directory"):
        load_model(str(tmp_path / "plain"), backend="packed")
    with pytest.raises(ModelError, match="unknown backend 'int3'"):
        load_model(str(tmp_path / "plain"), backend="int3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 4, 16, 17, 64])  # cuBLAS' int8 GEMM takes > 16 rows: fewer are padded
def test_int8_linear_on_cuda_follows_the_capability_and_is_exact(rows):
    qw = quantize_weight(torch.randn(64, 128), QuantSpec(bits=8, group_size=-1, symmetric=True))
    lin = Int8Linear(qw, A8, device="cuda")
    x = torch.randn(rows, 128, device="cuda")
    sm = torch.cuda.get_device_capability()
    assert lin.kernel == ("int8-intmm" if sm >= (7, 5) else "int8-emulated")
    # the reference on the same device: the CPU and the GPU may round an input that sits on a code
    # boundary to different codes (seen on an H200: one flip moved the output by 1e-3 of its maximum)
    assert _rel(lin(x), _fake_w8a8(qw, A8, x)) < 1e-5


def test_no_int8_units_is_reported_per_linear(tmp_path, monkeypatch):
    q, _, _ = _quantized_dir(tmp_path, "w8a8", **W8A8)
    monkeypatch.setattr(capability, "cpu_flags", lambda path="/proc/cpuinfo": {"fpu", "avx2"})
    _, _, _, report = load_packed(q, torch.float32, "cpu")
    assert report.counts() == {"w8a8:int8-emulated": 14}
    [(reason, names)] = report.fallbacks().items()
    assert "none of amx_int8, avx512_vnni, avx_vnni" in reason and len(names) == 14


def test_study_records_packed_bytes_and_bench_of_each_quantized_model(tmp_path):
    from quantshift.errors import ConfigError
    from quantshift.studies.runner import run_study
    from quantshift.studies.spec import study_from_dict

    lm = loaded_tiny("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"{i} the river bends past the old mill. " * 4 for i in range(20)))
    spec = study_from_dict(
        {
            "name": "pb",
            "models": [str(tmp_path / "tiny")],
            "device": "cpu",
            "include_fp": False,
            "methods": [{"method": "rtn", "wbits": [4, 2], "group_size": 32}],
            "calibration": {"sources": [str(text)], "n": 2, "seqlen": 32},
            "evaluation": {"ppl": [str(text)], "ppl_seqlen": 32, "ppl_windows": 1, "bench": True},
            "diagnostics": {"enabled": False},
            "keep_models": True,
        }
    )
    run_study(spec, tmp_path / "out", tmp_path / "cache", progress=False, echo=lambda *a, **k: None)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "cache" / "quant").glob("*.json"))]
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (160, 64), (160, 64), (64, 160)] * 2
    floats = 2 * (128 * 64 + 2 * (2 * 64) + 64)
    groups = sum(o * i // 32 for o, i in shapes)
    expect = {floats + sum(o * i * bits // 8 for o, i in shapes) + 2 * groups + groups * bits // 8 for bits in (4, 2)}
    assert {r["packed_bytes"] for r in records} == expect
    benches = [json.loads(p.read_text()) for p in sorted((tmp_path / "cache" / "bench").glob("*.json"))]
    assert len(benches) == 2 and all(b["variant"] == "packed-bf16" for b in benches)
    assert {b["metrics"]["bench:packing"]["modules"]["model.layers.0.mlp.down_proj"]["kernel"] for b in benches} == {
        "int4mm-cpu",
        "dequant",
    }  # 4-bit on the int4 kernel, 2-bit dequantized on the fly
    assert all(b["metrics"]["bench:decode@1"]["tokens_per_s"] > 0 for b in benches)
    with pytest.raises(ConfigError, match="keep_models"):
        study_from_dict(
            {
                "name": "pb",
                "models": ["x"],
                "methods": [{"method": "rtn"}],
                "evaluation": {"ppl": ["news"], "bench": True},
            }
        )


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    from quantshift.bench.measure import compiled_step, prefill_and_decode, run_bench

    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    for seed in (0, 1):  # the second model must get its own graph, not the first one's
        model = loaded_tiny("llama", seed=seed).model
        eager = prefill_and_decode(model, ids, 6, "static").tokens
        assert torch.equal(prefill_and_decode(model, ids, 6, "static", compiled_step(model)).tokens, eager)
    metrics, _ = run_bench(model, batch_sizes=[1], prompt_len=8, gen_len=4, compile=True, copy_mib=8)
    d = metrics["bench:decode@1"]
    assert d["compiled"] and d["compile_s"] > 0 and d["cache"] == "static"


def test_cli_eval_backend_packed_reports_kernels_and_matches_fake(tmp_path):
    q, _, _ = _quantized_dir(tmp_path, "w4", **W4)
    text = tmp_path / "t.txt"
    text.write_text(
        "\n\n".join(f"{i} the river bends past the old mill, where farmers bring grain. " * 3 for i in range(30))
    )

    def ppl(backend):
        out = tmp_path / f"{backend}.json"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "quantshift.cli",
                "eval",
                str(q),
                "--ppl",
                str(text),
                "--seqlen",
                "32",
                "--max-windows",
                "4",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--backend",
                backend,
                "--quiet",
                "--json",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        [m] = [v for k, v in json.loads(out.read_text())["metrics"].items() if k.startswith("ppl:")]
        return m["ppl"], r.stdout

    fake, out_fake = ppl("fake")
    packed, out_packed = ppl("packed")
    assert "packed linears: 14 w4a16:int4mm-cpu" in out_packed and "packed linears" not in out_fake
    assert abs(packed / fake - 1) < 0.01


@pytest.mark.slow
def test_cpu_decode_benchmark_script_runs_small(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_decode_vs_llamacpp.py"
    spec = importlib.util.spec_from_file_location("cpu_decode_vs_llamacpp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(
        [
            "--variants",
            "llama.cpp,fp32,w4",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "cd.json"),
        ]
    )
    assert {"fp32", "w4"} <= set(res["rows"]) and res["rows"]["w4"]["packing"] == {"w4a16:int4mm-cpu": 210}
    assert res["rows"]["w4"]["decode_bytes_per_step"] < res["rows"]["fp32"]["decode_bytes_per_step"] / 3
    assert ("llama.cpp" in res["rows"]) != any("llama.cpp skipped" in n for n in res["notes"])
    assert json.loads((tmp_path / "cd.json").read_text())["rows"].keys() == res["rows"].keys()


def test_int8_head_quantizes_only_the_output_projection(tmp_path):
    """--head int8: the output projection becomes an Int8Linear (llama.cpp's Q8_0 head), the tied
    input embedding stays float, logits stay close to the float head's, and the report says so."""
    from quantshift.errors import ModelError

    lm = loaded_tiny("llama")
    q = save(
        lm, quantize_model(lm, recipe_from_cli("rtn", wbits=4, group_size=32), None, progress=False), tmp_path / "q"
    )
    ref, _, _, rep_f = load_packed(q, torch.float32, "cpu")
    model, _, _, rep = load_packed(q, torch.float32, "cpu", head="int8")
    assert isinstance(model.lm_head, Int8Linear) and not isinstance(ref.lm_head, Int8Linear)
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert rep.choices["lm_head"].kind == "w8a8" and "lm_head" not in rep_f.choices
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = logits(model, ids), logits(ref, ids)
    assert _rel(a, b) < 0.03
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="unknown head"):
        load_packed(q, torch.float32, "cpu", head="int4")
    with pytest.raises(ModelError, match="needs backend 'packed'"):
        load_model(str(q), device="cpu", dtype="float32", head="int8")
