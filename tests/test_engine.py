"""The block engine end to end on tiny in-memory models (random weights, seconds on CPU)."""

import json

import pytest
import torch

from conftest import logits, loaded_tiny, random_calib
from quantshift.checkpoint import load_quantized
from quantshift.errors import ModelError
from quantshift.quantize import quantize_model, save
from quantshift.recipes import recipe_from_cli, recipe_from_dict

EVAL_IDS = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(7))


def _rel_logit_err(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def _quantized_err(kind, method, wbits, gs=32, calib=None, seed=0, **opts):
    fp = loaded_tiny(kind, seed)
    ref = logits(fp.model, EVAL_IDS)
    lm = loaded_tiny(kind, seed)
    res = quantize_model(lm, recipe_from_cli(method, wbits=wbits, group_size=gs, **opts), calib or random_calib(), progress=False)
    return _rel_logit_err(logits(lm.model, EVAL_IDS), ref), res, lm


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_more_bits_closer_to_fp(kind):
    e8, _, _ = _quantized_err(kind, "rtn", 8)
    e4, _, _ = _quantized_err(kind, "rtn", 4)
    e2, _, _ = _quantized_err(kind, "rtn", 2)
    assert e8 < 1e-3
    assert e8 < e4 < e2


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("wbits", [2, 3])
def test_gptq_beats_rtn_on_whole_model(kind, wbits):
    calib = random_calib(n=16, seqlen=48)
    e_rtn, _, _ = _quantized_err(kind, "rtn", wbits, calib=calib)
    e_gptq, res, _ = _quantized_err(kind, "gptq", wbits, calib=calib)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)
    # every linear of every block is reported, with its output error
    n_blocks = 2
    assert len(res.engine.modules) == 7 * n_blocks
    assert all("out_rel_err" in m.info for m in res.engine.modules.values())
    assert [b["block"] for b in res.engine.blocks] == list(range(n_blocks))


def test_group_size_not_dividing_width():
    # hidden 64, intermediate 160: group 48 leaves partial groups in every linear
    err, res, _ = _quantized_err("llama", "gptq", 4, gs=48)
    down = res.engine.modules["model.layers.0.mlp.down_proj"].qweight
    assert down.scale.shape == (64, 4)  # 160 = 48 + 48 + 48 + 16
    err_rtn, _, _ = _quantized_err("llama", "rtn", 4, gs=48)
    err_2bit, _, _ = _quantized_err("llama", "gptq", 2, gs=48)
    assert err < err_rtn and err < err_2bit / 3


def test_overrides_and_skips():
    rec = recipe_from_dict({"stages": [{"gptq": {"wbits": 3, "group_size": 32, "overrides": [
        {"pattern": r"layers\.0\.mlp\.down_proj", "wbits": 8},
        {"pattern": r"layers\.1\.self_attn\.o_proj", "skip": True}]}}]})
    lm = loaded_tiny("llama")
    before = lm.model.model.layers[1].self_attn.o_proj.weight.clone()
    res = quantize_model(lm, rec, random_calib(), progress=False)
    assert res.engine.modules["model.layers.0.mlp.down_proj"].qweight.spec.bits == 8
    assert res.engine.modules["model.layers.0.mlp.up_proj"].qweight.spec.bits == 3
    assert "model.layers.1.self_attn.o_proj" not in res.engine.modules
    assert torch.equal(before, lm.model.model.layers[1].self_attn.o_proj.weight)


def test_save_and_reload_reproduce_logits_exactly(tmp_path):
    _, res, lm = _quantized_err("llama", "gptq", 3)
    out = save(lm, res, tmp_path / "q")
    model, _, info = load_quantized(out, torch.float32, "cpu")
    assert torch.equal(logits(model, EVAL_IDS), logits(lm.model, EVAL_IDS))
    assert info["calibration"]["n"] == 8 and info["recipe"]["stages"][0]["gptq"]["wbits"] == 3
    report = json.loads((out / "report.json").read_text())
    assert len(report["blocks"]) == 2 and report["modules"]


def test_activation_quantization_is_real_and_survives_reload(tmp_path):
    fp = loaded_tiny("llama")
    ref = logits(fp.model, EVAL_IDS)
    lm = loaded_tiny("llama")
    res = quantize_model(lm, recipe_from_cli("rtn", wbits=8, abits=4, group_size=32), None, progress=False)
    got = logits(lm.model, EVAL_IDS)
    w8 = loaded_tiny("llama")
    quantize_model(w8, recipe_from_cli("rtn", wbits=8, group_size=32), None, progress=False)
    assert _rel_logit_err(got, ref) > 10 * _rel_logit_err(logits(w8.model, EVAL_IDS), ref)  # A4 is not a no-op
    out = save(lm, res, tmp_path / "a4")
    model, _, _ = load_quantized(out, torch.float32, "cpu")
    assert torch.equal(logits(model, EVAL_IDS), got)


def test_corrupt_directory_is_a_clear_error(tmp_path):
    _, res, lm = _quantized_err("llama", "rtn", 4)
    out = save(lm, res, tmp_path / "q")
    data = bytearray((out / "quantized.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "quantized.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its sha256"):
        load_quantized(out, torch.float32, "cpu")
    (out / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing model.safetensors"):
        load_quantized(out, torch.float32, "cpu")


def test_refuses_to_overwrite(tmp_path):
    _, res, lm = _quantized_err("llama", "rtn", 4)
    save(lm, res, tmp_path / "q")
    with pytest.raises(ModelError, match="exists"):
        save(lm, res, tmp_path / "q")


def test_linears_reading_the_same_input_share_statistics(monkeypatch):
    from quantshift.methods.gptq import GPTQ

    calls = []
    original = GPTQ.new_stats
    monkeypatch.setattr(GPTQ, "new_stats", lambda self, lin: calls.append(lin) or original(self, lin))
    quantize_model(loaded_tiny("llama"), recipe_from_cli("gptq", wbits=4, group_size=32), random_calib(), progress=False)
    assert len(calls) == 2 * 4  # per block: one for q/k/v, o, gate/up, down
