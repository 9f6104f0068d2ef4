"""PackedLinear (W4A16, dequantize on the fly) against the fake-quant linear it replaces."""

import pytest
import torch
from conftest import loaded_tiny, logits, random_calib

from quantshift.pipeline import quantize_model
from quantshift.quant.primitives import QuantizedWeight, QuantSpec, quantize_weight
from quantshift.quant.qlinear import PackedLinear, int4mm_unsupported_reason, pack_model
from quantshift.recipes import recipe_from_dict

X = torch.randn(5, 7, 256, generator=torch.Generator().manual_seed(3))


def _fake(qw, bias):
    lin = torch.nn.Linear(qw.codes.shape[1], qw.codes.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(qw.dequantize())
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bits,gs,sym", [(4, 64, True), (4, 64, False), (4, -1, False), (2, 32, False), (8, 48, True)])
def test_dequant_backend_matches_fake_quant(bits, gs, sym):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(bits))
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=gs, symmetric=sym))
    bias = torch.randn(96)
    packed = PackedLinear(qw, bias, backend="dequant")
    assert torch.equal(packed.dequantized_weight(), qw.dequantize())
    assert _rel(packed(X), _fake(qw, bias)(X)) < 1e-6
    assert packed.packed_bytes() < w.numel() * 4 * bits / 32 + 96 * 8 * (256 // max(gs, 1) + 1) + 96 * 4 + 1


def test_dequant_backend_handles_act_order_g_idx():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    qw = quantize_weight(w, QuantSpec(bits=4, group_size=64))
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(2))
    g_idx = (torch.arange(256) // 64)[perm]  # scattered groups, as act-order GPTQ writes them
    codes = torch.clamp(torch.round(w / qw.scale[:, g_idx]) + qw.zero[:, g_idx], 0, 15).to(torch.uint8)
    qg = QuantizedWeight(codes, qw.scale, qw.zero, qw.spec, g_idx)
    assert int4mm_unsupported_reason(qg, torch.device("cpu")) is not None
    packed = PackedLinear(qg, None)  # auto falls back to dequant
    assert packed.backend == "dequant"
    assert _rel(packed(X), _fake(qg, None)(X)) < 1e-6


@pytest.mark.parametrize("sym", [True, False])
def test_int4mm_cpu_kernel_matches_fake_quant(sym):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5))
    qw = quantize_weight(w, QuantSpec(bits=4, group_size=64, symmetric=sym))
    packed = PackedLinear(qw, torch.randn(96), backend="auto")
    assert packed.backend == "int4mm-cpu"
    ref = _fake(qw, packed.bias.float())(X)
    assert _rel(packed(X), ref) < 1e-2  # bfloat16 activations and scales (the kernel's fast path)
    assert packed(X).dtype == torch.float32
    # the float weight is not kept: packed storage is about an eighth of fp32
    assert packed.packed_bytes() < w.numel() * 4 / 6


@pytest.mark.parametrize("out_f", [40, 97])
def test_int4mm_cpu_falls_back_on_widths_it_cannot_pack(out_f):
    qw = quantize_weight(torch.randn(out_f, 256), QuantSpec(bits=4, group_size=64))
    packed = PackedLinear(qw, None)
    assert packed.backend == "dequant" and "multiples of 16" in (packed.fallback_reason or "")
    assert _rel(packed(X), _fake(qw, None)(X)) < 1e-6
    with pytest.raises(ValueError, match="multiples of 16"):
        PackedLinear(qw, None, backend="int4mm-cpu")


def test_int4mm_refuses_what_it_cannot_run():
    qw = quantize_weight(torch.randn(64, 160), QuantSpec(bits=4, group_size=48))
    with pytest.raises(ValueError, match="group size 48"):
        PackedLinear(qw, None, backend="int4mm-cpu")
    q3 = quantize_weight(torch.randn(64, 128), QuantSpec(bits=3, group_size=32))
    with pytest.raises(ValueError, match="2, 4 or 8-bit"):
        PackedLinear(q3, None)


@pytest.mark.parametrize("backend", ["dequant", "auto"])
def test_whole_model_packed_matches_fake_quant(backend):
    lm = loaded_tiny("llama")
    res = quantize_model(
        lm,
        recipe_from_dict({"stages": [{"gptq": {"wbits": 4, "group_size": 32, "sym": False}}]}),
        random_calib(),
        progress=False,
    )
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(lm.model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_err = _rel(logits(lm.model, ids).float(), ref)  # what bf16 arithmetic alone costs
    chosen = pack_model(lm.model, {n: m.qweight for n, m in res.engine.modules.items()}, backend)
    assert len(chosen) == 14
    assert set(chosen.values()) == {"int4mm-cpu" if backend == "auto" else "dequant"}
    # int4mm runs in bf16 (activations, scales and the zero offsets s * (8 - z), a per-group
    # constant): measured 3x the error of bf16 autocast of the fake-quant model here
    assert _rel(logits(lm.model, ids), ref) < (1e-4 if backend == "dequant" else 4 * bf16_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int4mm_cuda_kernel_matches_fake_quant():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, QuantSpec(bits=4, group_size=128))
    packed = PackedLinear(qw, None, backend="int4mm-cuda", device="cuda")
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qw.dequantize().cuda().t()
    assert _rel(packed(x).float(), ref) < 2e-2  # bfloat16 activations and scales
