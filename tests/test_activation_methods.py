"""Activation-aware and activation-quantizing methods: AWQ, SmoothQuant, ZeroQuant, FP8 (W8A8) and
KV-cache quantization, alone and stacked, saved and reloaded (tiny, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import loaded_tiny, logits, random_calib, read_state

from quantshift.checkpoint import load_quantized
from quantshift.errors import ConfigError
from quantshift.methods.awq import clip_search, scaled_fake_quant, search_scale_layer
from quantshift.methods.smoothquant import smoothing_scales
from quantshift.pipeline import quantize_model, save
from quantshift.quant.primitives import (
    QuantSpec,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight,
)
from quantshift.quant.smoothing import output_error
from quantshift.recipes import recipe_from_dict

EVAL_IDS = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(7))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def _run(kind: str, stages: list, calib=None, seed: int = 0):
    lm = loaded_tiny(kind, seed)
    res = quantize_model(lm, recipe_from_dict({"stages": stages}), calib or random_calib(), progress=False)
    return lm, res


def _logit_err(kind: str, stages: list, calib=None) -> float:
    ref = logits(loaded_tiny(kind).model, EVAL_IDS)
    lm, _ = _run(kind, stages, calib)
    return _rel(logits(lm.model, EVAL_IDS), ref)


# --- single layers with planted outlier channels ------------------------------------------


def _outlier_layer(seed: int = 0, n_in: int = 256, n_out: int = 128, tokens: int = 2048):
    """Inputs with a few large-magnitude channels (as LLM activations have), plain weights."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g) * 0.05
    big = torch.ones(n_in)
    big[torch.randperm(n_in, generator=g)[:6]] = 40.0

    def sample(n: int) -> torch.Tensor:
        return torch.randn(n, n_in, generator=g) * big

    return W, sample(tokens), sample(tokens)  # weight, calibration inputs, held-out inputs


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_a_layer_with_outlier_channels(bits):
    W, Xc, Xt = _outlier_layer()
    spec = QuantSpec(bits=bits, group_size=64)
    H = Xc.t() @ Xc / Xc.shape[0]
    s, alpha, errs = search_scale_layer([W], [spec], Xc.abs().mean(dim=0), H, grid=20)
    assert alpha > 0 and min(errs) < errs[0]  # alpha = 0 (plain RTN) is on the grid and loses
    Ht = Xt.t() @ Xt / Xt.shape[0]  # judge on held-out tokens
    e_rtn = float(output_error(W, fake_quantize_weight(W, spec), Ht))
    e_awq = float(output_error(W, scaled_fake_quant(W, s, spec), Ht))
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)


def test_awq_clip_search_lowers_output_error():
    g = torch.Generator().manual_seed(1)
    W = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02  # heavy tails: clipping pays
    X = torch.randn(2048, 256, generator=g)
    H = X.t() @ X / X.shape[0]
    spec = QuantSpec(bits=3, group_size=64)
    Wc, ratios = clip_search(W, H, spec)
    e_plain = float(output_error(W, fake_quantize_weight(W, spec), H))
    e_clip = float(output_error(W, fake_quantize_weight(Wc, spec), H))
    assert e_clip < 0.9 * e_plain and float(ratios.min()) < 1.0


def test_smoothquant_w8a8_beats_naive_w8a8_on_a_layer():
    W, Xc, Xt = _outlier_layer(n_out=256)
    y = Xt @ W.t()
    a8 = QuantSpec(bits=8, group_size=0, symmetric=True)

    def run(X, Wm, wgs, per_token):
        wq = fake_quantize_weight(Wm, QuantSpec(bits=8, group_size=wgs, symmetric=True))
        return fake_quantize_activation(X, a8, per_token=per_token) @ wq.t()

    naive = _rel(run(Xt, W, 0, False), y)  # per-tensor weights and activations
    unsmoothed = _rel(run(Xt, W, -1, True), y)  # the W8A8 formats without smoothing
    s = smoothing_scales(Xc.abs().amax(dim=0), W.abs().amax(dim=0), 0.5)
    smooth = _rel(run(Xt / s, W * s, -1, True), y)
    assert smooth < 0.3 * unsmoothed < naive, (smooth, unsmoothed, naive)


def test_fp8_weight_error_far_below_int4():
    W, _, _ = _outlier_layer()
    W = W * torch.exp(
        torch.randn(W.shape[0], 1, generator=torch.Generator().manual_seed(0))
    )  # rows of different magnitudes
    fp8 = QuantSpec(bits=8, group_size=-1, dtype="fp8")
    q = quantize_weight(W, fp8)
    assert q.codes.dtype == torch.float8_e4m3fn
    e_fp8 = _rel(q.dequantize(), W)
    e_int4 = _rel(fake_quantize_weight(W, QuantSpec(bits=4, group_size=128)), W)
    assert e_fp8 < 0.1 * e_int4, (e_fp8, e_int4)  # ~3 mantissa bits vs 16 levels
    # E4M3 spans ~2e5 in magnitude: rows 1e4 x smaller than the largest fall into subnormals
    # under one per-tensor scale, while per-channel scales keep them exact to 3 mantissa bits
    W[:8] *= 1e-4
    small_tensor = _rel(fake_quantize_weight(W, QuantSpec(bits=8, group_size=0, dtype="fp8"))[:8], W[:8])
    small_channel = _rel(quantize_weight(W, fp8).dequantize()[:8], W[:8])
    assert small_channel < 2 * e_fp8 and small_tensor > 20 * small_channel, (small_channel, small_tensor)


# --- whole tiny models --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_awq_beats_rtn_on_whole_models(kind):
    calib = random_calib(n=16, seqlen=48)
    e_rtn = _logit_err(kind, [{"rtn": {"wbits": 3, "group_size": 32}}], calib)
    e_awq = _logit_err(kind, [{"awq": {"wbits": 3, "group_size": 32}}], calib)
    assert e_awq < 0.95 * e_rtn, (e_awq, e_rtn)


def test_awq_block_objective_beats_rtn():
    e_rtn = _logit_err("llama", [{"rtn": {"wbits": 3, "group_size": 32}}])
    e_awq = _logit_err("llama", [{"awq": {"wbits": 3, "group_size": 32, "objective": "block"}}])
    assert e_awq < 0.95 * e_rtn, (e_awq, e_rtn)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_smoothing_alone_preserves_the_function(kind):
    # folding into Llama/Qwen norms (x*w) and Gemma norms (x*(1+w)) alike
    ref = logits(loaded_tiny(kind).model, EVAL_IDS)
    lm, res = _run(kind, [{"smoothquant": {"quantize": False, "alpha": 0.8, "fold_into_linears": True}}])
    assert _rel(logits(lm.model, EVAL_IDS), ref) < 1e-9
    norm = lm.model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, loaded_tiny(kind).model.model.layers[0].input_layernorm.weight)
    assert not res.engine.modules  # nothing quantized, nothing recorded as quantized
    lm, _ = _run(kind, [{"awq": {"quantize": False, "clip": False, "wbits": 3, "group_size": 32}}])
    assert _rel(logits(lm.model, EVAL_IDS), ref) < 1e-9


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_smoothquant_w8a8_beats_naive_per_tensor_w8a8(kind):
    naive = _logit_err(kind, [{"rtn": {"wbits": 8, "group_size": 0, "sym": True, "abits": 8, "act_per_token": False}}])
    sq = _logit_err(kind, [{"smoothquant": {}}])
    sq_static = _logit_err(kind, [{"smoothquant": {"act_static": True, "act_per_token": False}}])
    assert sq < 0.5 * naive, (sq, naive)
    assert sq_static < naive, (sq_static, naive)


def test_smoothquant_activation_quantization_is_real():
    # the same smoothed W8 weights without A8 are much closer to fp: the A8 hooks act
    w8 = _logit_err("llama", [{"smoothquant": {"abits": 16}}])
    w8a8 = _logit_err("llama", [{"smoothquant": {}}])
    w8a4 = _logit_err("llama", [{"smoothquant": {"abits": 4}}])
    assert w8 < w8a8 < w8a4


def test_zeroquant_formats_behave():
    w8a8 = _logit_err("llama", [{"zeroquant": {}}])
    w4a8 = _logit_err("llama", [{"zeroquant": {"wbits": 4}}])
    w4 = _logit_err("llama", [{"rtn": {"wbits": 4, "group_size": 64, "sym": True}}])
    w8 = _logit_err("llama", [{"rtn": {"wbits": 8, "group_size": 64, "sym": True}}])
    assert w8a8 < 0.1 * w4a8
    assert abs(w4a8 - w4) < 0.1 * w4  # 8-bit token-wise activations add little to W4 g64
    assert w8 < w8a8  # the activation quantizers are really there


def test_fp8_whole_model():
    e_fp8 = _logit_err("llama", [{"fp8": {"abits": 16}}])
    e_fp8a = _logit_err("llama", [{"fp8": {}}])
    e_int4 = _logit_err("llama", [{"rtn": {"wbits": 4, "group_size": 32}}])
    assert e_fp8 < e_fp8a < 0.2 * e_int4


def test_kvcache_int4_changes_outputs_int8_barely():
    ref = logits(loaded_tiny("llama").model, EVAL_IDS)
    e8 = _logit_err("llama", [{"kvcache": {"bits": 8}}])
    e4 = _logit_err("llama", [{"kvcache": {"bits": 4}}])
    e4_token = _logit_err("llama", [{"kvcache": {"bits": 4, "granularity": "token"}}])
    assert e8 < 1e-3 and e4 > 30 * e8 and e4 > 1e-3
    assert e4 < e4_token  # one range per head is finer than one per token
    lm, res = _run("llama", [{"kvcache": {"bits": 4}}])
    assert sorted(res.engine.modules) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"]
    base = loaded_tiny("llama").model
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), base.state_dict().values()))
    assert not torch.equal(logits(lm.model, EVAL_IDS), ref)


RECIPES = {
    "awq": [{"awq": {"wbits": 3, "group_size": 32}}],
    "awq_w4a8": [{"awq": {"wbits": 4, "group_size": 32, "abits": 8}}],
    "smoothquant": [{"smoothquant": {"alpha": 0.8}}],
    "smoothquant_static_w4a8": [
        {"smoothquant": {"wbits": 4, "group_size": 32, "act_static": True, "act_per_token": False}}
    ],
    "zeroquant_w4a8": [{"zeroquant": {"wbits": 4, "group_size": 32}}],
    "fp8": [{"fp8": {}}],
    "fp8_tensor": [{"fp8": {"granularity": "tensor", "act_per_token": False}}],
    "kvcache": [{"kvcache": {"bits": 4}}],
    "sq_gptq_kv": [
        {"smoothquant": {"alpha": 0.8, "quantize": False}},
        {"gptq": {"wbits": 4, "group_size": 32, "abits": 8}},
        {"kvcache": {"bits": 8}},
    ],
    "kv_awq_gptq": [
        {"kvcache": {"bits": 8}},
        {"awq": {"wbits": 3, "group_size": 32, "quantize": False}},
        {"gptq": {"wbits": 3, "group_size": 32}},
    ],
}


# every recipe on llama; the other families (qkv biases, Gemma norms) on one of each method
CASES = [("llama", n) for n in sorted(RECIPES)] + [
    (k, n)
    for k in ("qwen2", "gemma3")
    for n in ("awq", "smoothquant_static_w4a8", "zeroquant_w4a8", "fp8", "kvcache", "sq_gptq_kv")
]


@pytest.mark.parametrize("kind,name", CASES)
def test_every_method_saves_and_reloads_exactly(kind, name, tmp_path):
    stages = RECIPES[name]
    ref = logits(loaded_tiny(kind).model, EVAL_IDS)
    lm, res = _run(kind, stages, random_calib(n=4, seqlen=32))
    got = logits(lm.model, EVAL_IDS)
    assert torch.isfinite(got).all()
    assert 0 < _rel(got, ref) < 1.0
    out = save(lm, res, tmp_path / name)
    model, _, info = load_quantized(out, torch.float32, "cpu")
    assert torch.equal(logits(model, EVAL_IDS), got)
    assert [next(iter(s)) for s in info["recipe"]["stages"]] == [next(iter(s)) for s in stages]
    if any("kvcache" in s for s in stages):
        assert len(info["output_quantizers"]) == 4  # k and v of two blocks, after any later stage too
    if name == "sq_gptq_kv":  # what the transform-only stage did is in the report too
        smoothed = res.report()["transforms"]["model.layers.0.self_attn.q_proj"]
        assert smoothed["smooth_scale_max"] >= smoothed["smooth_scale_min"] > 0
    if name.startswith("fp8"):
        assert read_state(out)["model.layers.0.mlp.down_proj.codes"].dtype == torch.float8_e4m3fn
    if "static" in name:
        table = json.loads((out / "quantshift.json").read_text())["input_quantizers"]
        assert all(e["static_scale"] > 0 for e in table.values())


# --- bad options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage,key",
    [
        ({"awq": {"alpha_grid": 3}}, "alpha_grid"),
        ({"awq": {"objective": "blocks"}}, "objective"),
        ({"awq": {"max_shrink": 1.5}}, "max_shrink"),
        ({"awq": {"quantize": False, "abits": 8}}, "abits"),
        ({"smoothquant": {"quantize": False, "abits": 8}}, "abits"),
        ({"smoothquant": {"alpha": 1.5}}, "alpha"),
        ({"smoothquant": {"alpah": 0.5}}, "alpah"),
        ({"smoothquant": {"act_static": True, "act_per_token": True}}, "act_per_token"),
        ({"zeroquant": {"act_per_token": False}}, "act_per_token"),
        ({"zeroquant": {"abits": 3}}, "abits"),
        ({"fp8": {"group_size": 32}}, "group_size"),
        ({"fp8": {"wbits": 4}}, "wbits"),
        ({"fp8": {"granularity": "group"}}, "granularity"),
        ({"kvcache": {"wbits": 4}}, "wbits"),
        ({"kvcache": {"bits": 1}}, "bits"),
        ({"kvcache": {"granularity": "channel"}}, "granularity"),
    ],
)
def test_bad_options_name_the_key(stage, key):
    with pytest.raises(ConfigError, match=key):
        recipe_from_dict({"stages": [stage]})


def test_gqa_v_to_o_mapping_is_skipped_and_recorded():
    # tiny models: 4 query heads, 2 kv heads -> v_proj out 32 != o_proj in 64
    lm, res = _run("llama", [{"awq": {"wbits": 3, "group_size": 32}}])
    o = res.engine.modules["model.layers.0.self_attn.o_proj"].info
    assert "awq_skipped" in o and "awq_alpha" not in o
    assert "awq_alpha" in res.engine.modules["model.layers.0.mlp.down_proj"].info
