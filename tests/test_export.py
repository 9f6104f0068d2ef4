"""Export round trips: quantize -> export -> reload with a loader that is not the exporter ->
the fake-quant model's logits.

Tolerances (max |logit difference| / max |logit|, on a tiny llama with random weights):
- float32 exports (compressed-tensors, fp8): 1e-5 - the encodings are exact, only summation
  order may differ;
- float16 exports (GPTQ's scales are float16 by convention; compressed-tensors default): 5e-3,
  the rounding of scales and float weights to 11 significant bits. Codes, zero points and
  g_idx are additionally checked to be *identical* to the quantizer's.
"""

import json
import sys

import pytest
import torch
from conftest import loaded_tiny, logits, random_calib, read_state
from hypothesis import given, settings
from hypothesis import strategies as st

from quantshift.checkpoint import save_quantized, write_json_atomic
from quantshift.exporters import ExportError, export
from quantshift.pipeline import quantize_model, save
from quantshift.quant.engine import QuantizedModule
from quantshift.quant.primitives import QuantSpec, pack_codes, quantize_weight, unpack_codes
from quantshift.recipes import recipe_from_cli, recipe_from_dict

IDS = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(11))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _quantized(tmp_path, method="rtn", calib=None, name="q", recipe=None, kind="llama", **opts):
    lm = loaded_tiny(kind)
    rec = recipe or recipe_from_cli(method, **opts)
    res = quantize_model(
        lm, rec, calib if calib is not None else (random_calib() if rec.needs_calibration else None), progress=False
    )
    out = save(lm, res, tmp_path / name)
    return out, logits(lm.model, IDS), res


# --- independent loaders --------------------------------------------------------------------


def _model_from(export_dir, state):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((export_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "transformers_version"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("lm_head") for k in missing), missing
    model.tie_weights()
    return model


def ct_decompress(export_dir):
    """Rebuild float weights with compressed-tensors' own decompressors, from the files alone."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = QuantizationConfig.model_validate(
        json.loads((export_dir / "config.json").read_text())["quantization_config"]
    )
    state = read_state(export_dir)
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_scale")})
    for mod in modules:
        # a module's own name outranks a class target (compressed-tensors and vLLM both match so)
        named = [s for s in qcfg.config_groups.values() if mod in s.targets]
        scheme = (named or [s for s in qcfg.config_groups.values() if "Linear" in s.targets])[0]
        assert mod not in qcfg.ignore
        local = {k[len(mod) + 1 :]: state.pop(k) for k in list(state) if k.startswith(mod + ".")}
        dec = BaseCompressor.get_value_from_registry(scheme.format).decompress(local, scheme)
        state[f"{mod}.weight"] = dec["weight"]
    return _model_from(export_dir, state), qcfg


def gptq_unpack(export_dir):
    """A from-the-spec GPTQ reader (bit shifts written here, not the exporter's unpack)."""

    qcfg = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    bits = qcfg["bits"]
    per, maxq = 32 // bits, 2**bits - 1
    offset = 1 if qcfg["checkpoint_format"] == "gptq" else 0
    state = read_state(export_dir)
    raw = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        mod = key[: -len(".qweight")]
        qweight, qzeros = state.pop(f"{mod}.qweight"), state.pop(f"{mod}.qzeros")
        scales, g_idx = state.pop(f"{mod}.scales").float(), state.pop(f"{mod}.g_idx").long()
        shifts = torch.arange(per, dtype=torch.int32) * bits
        codes = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & maxq).reshape(-1, qweight.shape[1])  # [in, out]
        zeros = ((qzeros.unsqueeze(2) >> shifts[None, None, :]) & maxq).reshape(qzeros.shape[0], -1) + offset
        w = scales[g_idx] * (codes.float() - zeros[g_idx].float())  # [in, out]
        state[f"{mod}.weight"] = w.t().contiguous()
        raw[mod] = (codes.t(), zeros, g_idx)
    return _model_from(export_dir, state), raw


# --- compressed-tensors -----------------------------------------------------------------------


def test_ct_symmetric_int4_loads_in_transformers_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    q, ref, _ = _quantized(tmp_path, "gptq", wbits=4, group_size=32, sym=True)
    out = export(q, "compressed-tensors", tmp_path / "ct", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    (group,) = cfg["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32 and group["weights"]["symmetric"]
    assert "lm_head" in cfg["ignore"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # the library's loader
    assert _rel(logits(model, IDS), ref) < 1e-5
    lib, _ = ct_decompress(out)
    assert _rel(logits(lib, IDS), ref) < 1e-5


def test_ct_asymmetric_gptq_round_trip(tmp_path):
    # transformers 5.23 + compressed-tensors 0.20 cannot load asymmetric pack-quantized dirs
    # (it initialises unpacked zero points; llm-compressor issue #1618), so the library's own
    # decompressor reads the file here; vLLM reads the packed [out/8, groups] zero points.
    q, ref, res = _quantized(tmp_path, "gptq", wbits=4, group_size=32, sym=False)
    out = export(q, "compressed-tensors", tmp_path / "ct", dtype="float32")
    model, qcfg = ct_decompress(out)
    assert _rel(logits(model, IDS), ref) < 1e-5

    st_ = read_state(out)
    assert st_["model.layers.0.mlp.down_proj.weight_zero_point"].shape == (64 // 8, 160 // 32)
    assert st_["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32


def test_ct_w8a8_activation_quantization_is_exported(tmp_path):
    from transformers import AutoModelForCausalLM

    q, ref, _ = _quantized(tmp_path, "rtn", wbits=8, group_size=-1, sym=True, abits=8)
    out = export(q, "compressed-tensors", tmp_path / "ct", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    assert cfg["format"] == "int-quantized"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits(model, IDS)
    assert _rel(got, ref) < 1e-5
    w_only, w_ref, _ = _quantized(tmp_path, "rtn", name="w8", wbits=8, group_size=-1, sym=True)
    assert _rel(w_ref, ref) > 1e-4  # the activation quantization is visible, and was reproduced


def test_ct_default_fp16_and_mixed_precision(tmp_path):
    rec = recipe_from_dict(
        {
            "stages": [
                {
                    "rtn": {
                        "wbits": 4,
                        "group_size": 32,
                        "sym": True,
                        "overrides": [
                            {"pattern": r"mlp\.down_proj", "wbits": 8, "group_size": -1},
                            {"pattern": r"layers\.1\.self_attn\.o_proj", "skip": True},
                        ],
                    }
                }
            ]
        }
    )
    q, ref, _ = _quantized(tmp_path, recipe=rec)
    out = export(q, "compressed-tensors", tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and cfg.get("dtype", "float16") == "float16"
    groups = cfg["quantization_config"]["config_groups"]
    assert len(groups) == 2 and groups["group_0"]["targets"] == ["Linear"]
    assert sorted(groups["group_1"]["targets"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.1.self_attn.o_proj" in cfg["quantization_config"]["ignore"]
    model, _ = ct_decompress(out)
    assert _rel(logits(model, IDS), ref) < 5e-3


# --- GPTQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sym,version,act_order", [(True, 1, False), (False, 1, False), (False, 2, True), (True, 1, True)]
)
def test_gptq_round_trip(tmp_path, sym, version, act_order):
    q, ref, res = _quantized(
        tmp_path,
        recipe=recipe_from_dict(
            {
                "stages": [
                    {"gptq": {"wbits": 4, "group_size": 32, "sym": sym, "act_order": act_order, "static_groups": False}}
                ]
            }
        ),
    )
    out = export(q, "gptq", tmp_path / "g", gptq_version=version)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["desc_act"] is act_order and qcfg["sym"] is sym
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    model, raw = gptq_unpack(out)
    assert _rel(logits(model, IDS), ref) < 5e-3
    for name, m in res.engine.modules.items():  # codes, zero points and groups are the quantizer's
        codes, zeros, g_idx = raw[name]
        qw = m.qweight
        assert torch.equal(codes.to(torch.uint8), qw.codes)
        assert torch.equal(zeros.t().float(), qw.zero)
        expect = qw.g_idx if qw.g_idx is not None else torch.arange(codes.shape[1]) // 32
        assert torch.equal(g_idx, expect)
    if act_order:
        assert any(m.qweight.g_idx is not None for m in res.engine.modules.values())


def test_gptq_v1_refuses_zero_point_zero(tmp_path):
    lm = loaded_tiny("llama")
    with torch.no_grad():  # a group with only non-negative weights has zero point 0 on an asym grid
        lm.model.model.layers[0].self_attn.q_proj.weight[:, :32].abs_()
    res = quantize_model(lm, recipe_from_cli("rtn", wbits=4, group_size=32), None, progress=False)
    q = save(lm, res, tmp_path / "q")
    with pytest.raises(ExportError, match="gptq-version 2"):
        export(q, "gptq", tmp_path / "g")
    out = export(q, "gptq", tmp_path / "g2", gptq_version=2)
    model, _ = gptq_unpack(out)
    assert _rel(logits(model, IDS), logits(lm.model, IDS)) < 5e-3


# --- FP8 -------------------------------------------------------------------------------------------


def _fp8_dir(tmp_path, group_size):
    lm = loaded_tiny("llama")
    modules = {}
    for name, m in lm.model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            qw = quantize_weight(m.weight.detach(), QuantSpec(bits=8, group_size=group_size, dtype="fp8"))
            with torch.no_grad():
                m.weight.copy_(qw.dequantize())
            modules[name] = QuantizedModule("fp8", qw, None, {})
    out = save_quantized(
        lm.model,
        lm.tokenizer,
        tmp_path / f"fp8{group_size}",
        base_model="tiny",
        recipe={"stages": [{"fp8": {}}]},
        calibration=None,
        modules=modules,
        report={},
    )
    return out, logits(lm.model, IDS)


@pytest.mark.parametrize("group_size", [-1, 0])
def test_fp8_round_trip(tmp_path, group_size):
    from transformers import AutoModelForCausalLM

    q, ref = _fp8_dir(tmp_path, group_size)
    out = export(q, "fp8", tmp_path / "f", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        cfg["format"] == "naive-quantized"
    )  # the library's pick for weight-only fp8 (float-quantized with fp8 inputs)

    st_ = read_state(out)
    assert st_["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _rel(logits(model, IDS), ref) < 1e-5
    with pytest.raises(ExportError, match="gptq"):
        export(q, "gptq", tmp_path / "g")


def test_fp8_format_refuses_integer_grids(tmp_path):
    q, _, _ = _quantized(tmp_path, "rtn", wbits=4, group_size=32)
    with pytest.raises(ExportError, match="--format fp8 needs fp8 weights"):
        export(q, "fp8", tmp_path / "f")


# --- refusals -----------------------------------------------------------------------------------


def _edit_info(q, fn):
    info = json.loads((q / "quantshift.json").read_text())
    fn(info)
    write_json_atomic(q / "quantshift.json", info)


@pytest.mark.parametrize(
    "fmt,opts,needle",
    [
        ("compressed-tensors", dict(wbits=3, group_size=32), "--allow-unservable"),
        ("gptq", dict(wbits=3, group_size=32), "only 2, 4 and 8 bits"),
        ("compressed-tensors", dict(wbits=4, group_size=48), "not a multiple of group_size 48"),
        ("gptq", dict(wbits=4, group_size=48), "not a multiple of group_size 48"),
        ("compressed-tensors", dict(wbits=16, abits=8), "quantize only their inputs"),
        ("compressed-tensors", dict(wbits=4, group_size=32, abits=8), "W8A8"),
        ("gptq", dict(wbits=8, group_size=-1, sym=True, abits=8), "weight-only"),
        ("compressed-tensors", dict(wbits=4, group_size=32, abits=6), "8-bit activations only"),
    ],
)
def test_unservable_formats_are_refused(tmp_path, fmt, opts, needle):
    q, _, _ = _quantized(tmp_path, "rtn", **opts)
    with pytest.raises(ExportError, match=needle):
        export(q, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unservable_bits_written_when_asked(tmp_path):
    q, ref, _ = _quantized(tmp_path, "rtn", wbits=3, group_size=32)
    out = export(q, "compressed-tensors", tmp_path / "ct", dtype="float32", allow_unservable=True)
    model, _ = ct_decompress(out)
    assert _rel(logits(model, IDS), ref) < 1e-5


def test_act_order_g_idx_refused_by_compressed_tensors(tmp_path):
    q, _, _ = _quantized(
        tmp_path,
        recipe=recipe_from_dict(
            {"stages": [{"gptq": {"wbits": 4, "group_size": 32, "act_order": True, "static_groups": False}}]}
        ),
    )
    with pytest.raises(ExportError, match="static_groups"):
        export(q, "compressed-tensors", tmp_path / "ct")


def test_default_gptq_is_act_order_with_static_groups_and_exports_to_both_formats(tmp_path):
    # the default visits columns out of order, but every group is a run of consecutive columns:
    # a plain g32 model for vLLM's compressed-tensors and GPTQ loaders
    q, ref, res = _quantized(tmp_path, recipe=recipe_from_dict({"stages": [{"gptq": {"wbits": 4, "group_size": 32}}]}))
    stage = json.loads((q / "quantshift.json").read_text())["recipe"]["stages"][0]["gptq"]
    assert stage["act_order"] is True and stage["static_groups"] is True
    assert all(m.qweight.g_idx is None for m in res.engine.modules.values())
    model, _ = ct_decompress(export(q, "compressed-tensors", tmp_path / "ct", dtype="float32"))
    assert _rel(logits(model, IDS), ref) < 1e-5
    out = export(q, "gptq", tmp_path / "g", gptq_version=2)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is False
    model, _ = gptq_unpack(out)
    assert _rel(logits(model, IDS), ref) < 5e-3


@pytest.mark.parametrize(
    "stage,needle", [("spqr", "outliers"), ("quip", "rotations"), ("mystery", "exportable = True")]
)
def test_methods_without_an_engine_format_are_refused(tmp_path, stage, needle):
    q, _, _ = _quantized(tmp_path, "rtn", wbits=4, group_size=32)
    _edit_info(q, lambda i: i["recipe"]["stages"].insert(0, {stage: {}}))
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match=needle):
            export(q, fmt, tmp_path / fmt)


def test_output_quantizers_refused(tmp_path):
    q, _, _ = _quantized(tmp_path, "rtn", wbits=4, group_size=32)
    _edit_info(
        q,
        lambda i: i.__setitem__(
            "output_quantizers",
            {
                "model.layers.0.self_attn.k_proj": {
                    "spec": QuantSpec(bits=8, group_size=0, symmetric=True).model_dump(),
                    "head_dim": 16,
                }
            },
        ),
    )
    with pytest.raises(ExportError, match="kv-cache-dtype"):
        export(q, "compressed-tensors", tmp_path / "ct")


def test_transform_only_modules_stay_float_and_are_listed(tmp_path):
    q, ref, _ = _quantized(
        tmp_path,
        "rtn",
        wbits=4,
        group_size=32,
        sym=True,
        recipe=recipe_from_dict(
            {"stages": [{"rtn": {"wbits": 4, "group_size": 32, "sym": True, "ignore": ["lm_head", r"layers\.1\.mlp"]}}]}
        ),
    )
    # a transform stage (e.g. smoothing) records modules whose float weights it changed
    _edit_info(
        q,
        lambda i: i["modules"].update({"model.layers.1.mlp.up_proj": {"stage": "smoothquant", "info": {"alpha": 0.5}}}),
    )
    for fmt, loader in (("compressed-tensors", ct_decompress), ("gptq", gptq_unpack)):
        out = export(q, fmt, tmp_path / fmt, dtype="float16")
        summary = json.loads((out / "quantshift_export.json").read_text())
        assert summary["transform_only_modules"] == ["model.layers.1.mlp.up_proj"]
        model, _ = loader(out)
        assert _rel(logits(model, IDS), ref) < 5e-3
    gcfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert any("layers[.]1[.]mlp[.]up_proj" in k for k in gcfg["dynamic"])


def test_refuses_to_overwrite_and_non_quantized_dirs(tmp_path):
    q, _, _ = _quantized(tmp_path, "rtn", wbits=4, group_size=32, sym=True)
    export(q, "gptq", tmp_path / "g")
    with pytest.raises(ExportError, match="exists"):
        export(q, "gptq", tmp_path / "g")
    with pytest.raises(ExportError, match="not a quantshift quantized directory"):
        export(tmp_path / "g", "gptq", tmp_path / "g3")
    with pytest.raises(ExportError, match="unknown export format"):
        export(q, "gguf", tmp_path / "x")


def test_cli_export_and_error(tmp_path):
    import subprocess

    q, _, _ = _quantized(tmp_path, "rtn", wbits=4, group_size=32, sym=True)
    r = subprocess.run(
        [sys.executable, "-m", "quantshift.cli", "export", str(q), "--format", "gptq", "--out", str(tmp_path / "g")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "vllm serve" in r.stdout and (tmp_path / "g" / "quantize_config.json").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "quantshift.cli", "export", str(q), "--format", "gptq", "--out", str(tmp_path / "g")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


# --- packing ----------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 1000),
)
def test_pack_unpack_exact(bits, rows, cols, dim, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g).to(torch.uint8)
    words = pack_codes(codes, bits, dim=dim)
    assert words.dtype == torch.int32
    assert torch.equal(unpack_codes(words, bits, codes.shape[dim], dim=dim), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    # an independent implementation of the same low-bits-first layout
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (16, 64), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    theirs = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(pack_codes(codes, bits, dim=1), theirs)


# --- the registered methods end to end ----------------------------------------------------------


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_method_w8a8_loads_in_transformers(tmp_path, granularity):
    from transformers import AutoModelForCausalLM

    q, ref, _ = _quantized(tmp_path, recipe=recipe_from_dict({"stages": [{"fp8": {"granularity": granularity}}]}))
    out = export(q, "fp8", tmp_path / "f", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    assert cfg["format"] == "float-quantized" and group["input_activations"]["type"] == "float"
    assert group["weights"]["strategy"] == granularity
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _rel(logits(model, IDS), ref) < 1e-5


def test_smoothquant_w8a8_and_awq_w4_export(tmp_path):
    from transformers import AutoModelForCausalLM

    q, ref, _ = _quantized(tmp_path, recipe=recipe_from_dict({"stages": [{"smoothquant": {"alpha": 0.5}}]}), name="sq")
    out = export(q, "compressed-tensors", tmp_path / "sq_ct", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _rel(logits(model, IDS), ref) < 1e-5
    q, ref, _ = _quantized(
        tmp_path,
        recipe=recipe_from_dict({"stages": [{"awq": {"wbits": 4, "group_size": 32, "grid": 4, "clip_grid": 4}}]}),
        name="awq",
    )
    out = export(q, "gptq", tmp_path / "awq_g", gptq_version=2)
    model, _ = gptq_unpack(out)
    assert _rel(logits(model, IDS), ref) < 5e-3


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_other_architectures_round_trip(tmp_path, kind):
    # qwen2: biases on q/k/v and untied lm_head; gemma3: its own norms and head_dim
    from transformers import AutoModelForCausalLM

    q, ref, _ = _quantized(tmp_path, "gptq", kind=kind, wbits=4, group_size=32, sym=True)
    out = export(q, "compressed-tensors", tmp_path / "ct", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _rel(logits(model, IDS), ref) < 1e-5
    out = export(q, "gptq", tmp_path / "g")
    model, _ = gptq_unpack(out)
    assert _rel(logits(model, IDS), ref) < 5e-3
