"""Compute precision: detection of bf16 matrix units, what --dtype auto means, and its effect."""

import pytest
import torch
from conftest import loaded_tiny, logits, random_calib

from quantshift.errors import ModelError
from quantshift.models.precision import Precision, cpu_flags, native_bf16_cpu, resolve_precision
from quantshift.pipeline import quantize_model
from quantshift.recipes import recipe_from_cli


def test_native_bf16_is_read_from_the_processor_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n")
    assert native_bf16_cpu(cpu_flags(str(info)))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")  # AVX-512 alone emulates bf16
    assert not native_bf16_cpu(cpu_flags(str(info)))
    assert native_bf16_cpu({"amx_bf16", "amx_tile"})
    assert cpu_flags(str(tmp_path / "missing")) == set()  # not Linux: no flags, float32


def test_auto_is_bf16_autocast_only_on_a_cpu_with_bf16_units():
    fast = resolve_precision("auto", "cpu", flags={"avx512_bf16"})
    assert fast == Precision(torch.float32, torch.bfloat16) and fast.name == "float32+bfloat16-autocast"
    slow = resolve_precision("auto", "cpu", flags={"avx512f"})
    assert slow == Precision(torch.float32) and slow.name == "float32"
    assert resolve_precision("auto", "cuda", flags=set()) == Precision(torch.bfloat16)
    # an explicit dtype is what the user asked for, everywhere
    assert resolve_precision("float32", "cpu", flags={"avx512_bf16"}) == Precision(torch.float32)
    assert resolve_precision("bf16", "cpu", flags=set()) == Precision(torch.bfloat16)
    with pytest.raises(ModelError, match="unknown dtype 'fp64'.*allowed: auto"):
        resolve_precision("fp64", "cpu")


def test_autocast_context_runs_matmuls_in_bf16_and_nothing_else():
    p = Precision(torch.float32, torch.bfloat16)
    a = torch.randn(8, 8)
    with p.context("cpu"):
        assert (a @ a).dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32
    with Precision(torch.float32).context("cpu"):
        assert (a @ a).dtype == torch.float32


def test_bf16_autocast_quantization_keeps_float32_weights_and_quality():
    # the engine's forwards run under autocast, the solver in float32: weights stay float32 and
    # exactly on their grid, and the quantized model is as close to fp as the float32 path's
    ids = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(7))
    ref = logits(loaded_tiny("llama").model, ids)
    err = {}
    for prec in (Precision(torch.float32), Precision(torch.float32, torch.bfloat16)):
        lm = loaded_tiny("llama")
        lm.precision = prec
        res = quantize_model(lm, recipe_from_cli("gptq", wbits=4, group_size=16), random_calib(), progress=False)
        assert res.precision == prec.name and res.report()["precision"] == prec.name
        for name, m in res.engine.modules.items():
            lin = lm.model.get_submodule(name)
            assert lin.weight.dtype == torch.float32
            assert torch.allclose(lin.weight, m.qweight.dequantize(), atol=1e-6)
        err[prec.name] = float((logits(lm.model, ids) - ref).pow(2).sum() / ref.pow(2).sum())
    assert 0 < err["float32+bfloat16-autocast"] < 1.25 * err["float32"]
