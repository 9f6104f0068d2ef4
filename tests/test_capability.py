"""Device capability decides every device-dependent choice (models.capability): dtype auto, the
int4 / int8 / fp8 kernels, each with its printed reason. Capabilities are faked (no GPU needed);
the kernels that also run on a CPU (int8 _int_mm, fp8 _scaled_mm) are checked against fake-quant."""

import pytest
import torch
from conftest import loaded_tiny, logits
from typer.testing import CliRunner

from quantshift.models import capability
from quantshift.models.capability import Capability, fake
from quantshift.models.precision import Precision, resolve_precision
from quantshift.quant.actquant import InputQuantizer
from quantshift.quant.fp8linear import FP8_GEMM_TOLERANCE, FP8Linear, fp8_activation_codes, fp8_choice
from quantshift.quant.int8linear import Int8Linear, int8_choice
from quantshift.quant.primitives import QuantSpec, fake_quantize_activation, quantize_weight
from quantshift.quant.qlinear import PackedLinear, int4_choice

V100, T4, A100, L4, H100 = (
    fake("cuda", sm, name)
    for sm, name in (
        ((7, 0), "Tesla V100-SXM2-16GB"),
        ((7, 5), "Tesla T4"),
        ((8, 0), "NVIDIA A100"),
        ((8, 9), "NVIDIA L4"),
        ((9, 0), "NVIDIA H100"),
    )
)
NO_GPU = fake("cuda")
VNNI_BF16 = fake("cpu", flags={"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
PLAIN_CPU = fake("cpu", flags={"avx2", "avx512f"})
FP8_A = {"spec": QuantSpec(bits=8, group_size=0, symmetric=True, dtype="fp8").model_dump(), "per_token": True}
INT8_A = {"spec": QuantSpec(bits=8, group_size=0, symmetric=True).model_dump(), "per_token": True}


def _int4(out_f=96, in_f=256, gs=64):
    return quantize_weight(
        torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)),
        QuantSpec(bits=4, group_size=gs, symmetric=False),
    )


def _fp8(out_f=48, in_f=96, granularity=-1):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1))
    w[:, :2] *= 10
    return quantize_weight(w, QuantSpec(bits=8, group_size=granularity, symmetric=True, dtype="fp8"))


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# --- dtype auto --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cap,weights,words",
    [
        (V100, torch.float16, ["float16", "Tesla V100", "sm70", "no bf16 units", "sm80+"]),
        (T4, torch.float16, ["float16", "sm75", "no bf16 units"]),
        (A100, torch.bfloat16, ["bfloat16", "sm80 has bf16 tensor cores"]),
        (H100, torch.bfloat16, ["bfloat16", "sm90"]),
        (NO_GPU, torch.bfloat16, ["no CUDA device visible", "sm80+ assumed"]),
    ],
)
def test_dtype_auto_on_gpus_follows_bf16_support(cap, weights, words):
    p = resolve_precision("auto", "cuda", capability=cap)
    assert p == Precision(weights) and p.autocast is None
    assert all(w in p.reason for w in words), p.reason
    # an explicit dtype is what the user asked for, whatever the device
    assert resolve_precision("bfloat16", "cuda", capability=V100) == Precision(torch.bfloat16)


def test_dtype_auto_on_cpus_is_unchanged_and_says_why():
    fast = resolve_precision("auto", "cpu", capability=VNNI_BF16)
    assert fast == Precision(torch.float32, torch.bfloat16) and "avx512_bf16" in fast.reason
    slow = resolve_precision("auto", "cpu", capability=PLAIN_CPU)
    assert slow == Precision(torch.float32) and "no bf16 matrix instructions" in slow.reason
    # without a capability given, the CPU's flags decide (as before)
    assert resolve_precision("auto", "cpu", flags={"amx_bf16"}).autocast == torch.bfloat16


def test_detect_reads_this_machine():
    cpu = capability.detect("cpu")
    assert cpu.kind == "cpu" and cpu.sm is None and cpu.flags == frozenset(capability.cpu_flags())
    gpu = capability.detect("cuda")
    assert gpu.kind == "cuda" and (gpu.sm is not None) == torch.cuda.is_available()
    assert capability.detect("auto").kind == ("cuda" if torch.cuda.is_available() else "cpu")


# --- int4 ----------------------------------------------------------------------------------------


def test_int4_kernel_needs_sm80_and_falls_back_with_the_reason():
    qw = _int4()
    for cap in (V100, T4):
        c = int4_choice(qw, cap)
        assert c.kernel == "dequant" and "tinygemm int4 kernel needs sm80+" in c.reason and cap.sm_text in c.reason
    assert int4_choice(qw, A100).kernel == "int4mm-cuda" and int4_choice(qw, A100).reason is None
    assert int4_choice(qw, H100).kernel == "int4mm-cuda"
    assert int4_choice(qw, NO_GPU).reason == "no CUDA device visible"
    # shapes still matter on a capable GPU, and the CPU kernel's own width rule on a CPU
    assert "in % 128" in int4_choice(_int4(96, 192), A100).reason
    assert int4_choice(_int4(96, 256), VNNI_BF16).kernel == "int4mm-cpu"
    assert "multiples of 16" in int4_choice(_int4(40, 256), VNNI_BF16).reason
    no_op = fake("cpu", flags={"avx2"}, ops={"int_mm", "scaled_mm"})
    assert int4_choice(qw, no_op).reason == "this torch has no CPU int4 kernel"


def test_packed_linear_without_the_int4_kernel_dequantizes_and_is_exact():
    qw = _int4()
    no_op = fake("cpu", flags={"avx2"}, ops={"int_mm", "scaled_mm"})
    packed = PackedLinear(qw, None, "auto", "cpu", capability=no_op)
    assert packed.backend == "dequant" and packed.fallback_reason == "this torch has no CPU int4 kernel"
    x = torch.randn(3, 256)
    assert _rel(packed(x), x @ qw.dequantize().t()) < 1e-6


# --- int8 ----------------------------------------------------------------------------------------


def test_int8_gemm_needs_sm75_or_int8_cpu_units():
    c = int8_choice(64, 128, V100)
    assert (
        c.kernel == "int8-emulated"
        and "torch._int_mm (int8 tensor cores) needs sm75+" in c.reason
        and "sm70" in c.reason
    )
    assert int8_choice(64, 128, T4).kernel == "int8-intmm" and int8_choice(64, 128, H100).reason is None
    assert "multiples of 8" in int8_choice(60, 128, A100).reason  # cuBLAS int8 GEMM shapes
    assert int8_choice(60, 128, VNNI_BF16).kernel == "int8-intmm"  # oneDNN has no such rule
    assert "none of amx_int8, avx512_vnni, avx_vnni" in int8_choice(64, 128, PLAIN_CPU).reason


@pytest.mark.parametrize("cap,kernel", [(A100, "int8-intmm"), (V100, "int8-emulated")])
def test_int8_linear_takes_the_capability_kernel_and_stays_exact(cap, kernel):
    # both kernels run on the CPU too, so the faked GPU's choice can be executed here
    qw = quantize_weight(torch.randn(64, 128), QuantSpec(bits=8, group_size=-1, symmetric=True))
    lin = Int8Linear(qw, INT8_A, capability=cap)
    assert lin.kernel == kernel and (lin.reason is None) == (kernel == "int8-intmm")
    x = torch.randn(5, 128)
    q = InputQuantizer(QuantSpec(**INT8_A["spec"]), True)
    ref = torch.nn.functional.linear(q(None, (x,))[0], qw.dequantize())
    assert _rel(lin(x), ref) < 1e-5


# --- fp8 -----------------------------------------------------------------------------------------


def test_fp8_gemm_needs_sm89_else_fake_quant_with_the_reason():
    qw = _fp8()
    for cap in (V100, A100):
        c = fp8_choice(qw, FP8_A, cap)
        assert c.kernel == "float" and "torch._scaled_mm (fp8 tensor cores) needs sm89+" in c.reason
    assert fp8_choice(qw, FP8_A, L4).kernel == "fp8-scaled-mm" and fp8_choice(qw, FP8_A, H100).reason is None
    assert "multiples of 16" in fp8_choice(_fp8(40, 96), FP8_A, H100).reason
    assert "fp8 runs as the exact fake-quant" in fp8_choice(qw, FP8_A, VNNI_BF16).reason
    assert "weight-only fp8" in fp8_choice(qw, None, H100).reason
    assert "this torch has no torch._scaled_mm" in fp8_choice(qw, FP8_A, fake("cuda", (9, 0), ops={"int_mm"})).reason


@pytest.mark.parametrize("granularity", [-1, 0])  # per channel, per tensor
@pytest.mark.parametrize("act", [FP8_A, {**FP8_A, "per_token": False}, {**FP8_A, "static_scale": 0.02}])
def test_fp8_linear_equals_the_fake_quant_module(granularity, act):
    qw = _fp8(granularity=granularity)
    bias = torch.randn(48)
    lin = FP8Linear(qw, act, bias, kernel="fp8-scaled-mm")  # torch's CPU _scaled_mm: the same arithmetic
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(2)) * 3
    q = InputQuantizer(QuantSpec(**act["spec"]), act["per_token"], act.get("static_scale"))
    ref = torch.nn.functional.linear(q(None, (x,))[0], qw.dequantize(), bias)
    assert _rel(lin(x), ref) < 1e-5
    codes, scale = fp8_activation_codes(x.reshape(-1, 96))
    assert torch.equal(codes.float() * scale, fake_quantize_activation(x.reshape(-1, 96), QuantSpec(**FP8_A["spec"])))
    assert lin.qweight.dtype == torch.float8_e4m3fn and lin.packed_bytes() < 48 * 96 * 2


def test_fp8_linear_auto_refuses_a_device_without_the_gemm():
    with pytest.raises(ValueError, match="needs sm89"):
        FP8Linear(_fp8(), FP8_A, capability=A100)


# --- the reasons, printed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cap,lines",
    [
        (
            V100,
            [
                "device: cuda Tesla V100-SXM2-16GB (sm70)",
                "dtype auto: float16",
                "int4 weights (W4A16): dequant (the tinygemm",
                "int8 W8A8: int8-emulated (torch._int_mm (int8 tensor cores) needs sm75+",
                "fp8 W8A8: float (torch._scaled_mm",
            ],
        ),
        (
            A100,
            [
                "dtype auto: bfloat16: sm80 has bf16 tensor cores",
                "int4 weights (W4A16): int4mm-cuda",
                "int8 W8A8: int8-intmm",
                "fp8 W8A8: float (torch._scaled_mm (fp8 tensor cores) needs sm89+",
            ],
        ),
        (H100, ["int4 weights (W4A16): int4mm-cuda", "int8 W8A8: int8-intmm", "fp8 W8A8: fp8-scaled-mm"]),
    ],
)
def test_device_command_prints_each_choice_and_reason(monkeypatch, cap, lines):
    from quantshift.cli import app

    asked = []
    monkeypatch.setattr(capability, "detect", lambda device="cpu", flags=None: asked.append(device) or cap)
    r = CliRunner().invoke(app, ["device", "--device", "cuda"])
    assert r.exit_code == 0, r.output
    assert asked == ["cuda"]
    for line in lines:
        assert line in r.output, (line, r.output)


def _fp8_dir(tmp_path):
    from quantshift.pipeline import quantize_model, save
    from quantshift.recipes import recipe_from_cli

    lm = loaded_tiny("llama")
    res = quantize_model(lm, recipe_from_cli("fp8"), None, progress=False)
    return save(lm, res, tmp_path / "fp8")


def test_packed_fp8_model_runs_the_fp8_gemm_where_capable_and_prints_why_not_elsewhere(tmp_path, monkeypatch):
    from quantshift.models.load import load_model
    from quantshift.quant.inference import load_packed

    q = _fp8_dir(tmp_path)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = logits(load_model(str(q), dtype="float32").model, ids)
    # this CPU: the exact fake-quant, with the reason in the report's printed lines
    _, _, _, report = load_packed(q, torch.float32, "cpu")
    assert report.counts() == {"float:float": 14}
    assert any("fp8 runs as the exact fake-quant" in line for line in report.lines()), report.lines()
    # a faked sm90: the fp8 GEMM (torch's CPU _scaled_mm runs the same arithmetic here), same logits
    monkeypatch.setattr(capability, "detect", lambda device="cpu", flags=None: H100)
    model, _, _, report = load_packed(q, torch.float32, "cpu")
    assert report.counts() == {"w8a8:fp8-scaled-mm": 14} and len(report.lines()) == 1
    assert not any(
        m._forward_pre_hooks for m in model.modules() if isinstance(m, FP8Linear)
    )  # quantizes its own inputs
    assert _rel(logits(model, ids), ref) < 1e-3


def test_capability_is_plain_data():
    cap = Capability("cuda", "X", (8, 6))
    assert cap.sm_text == "sm86" and cap.int4().kernel == "int4mm-cuda" and cap.fp8().kernel == "float"
    assert cap == fake("cuda", (8, 6), "X")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_this_gpu_runs_the_kernels_its_capability_names_and_they_equal_fake_quant():
    cap = capability.detect("cuda")
    sm = torch.cuda.get_device_capability()
    assert cap.sm == sm and resolve_precision("auto", "cuda").weights == (
        torch.bfloat16 if sm >= (8, 0) else torch.float16
    )
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    q4 = quantize_weight(w, QuantSpec(bits=4, group_size=128))
    p4 = PackedLinear(q4, None, "auto", "cuda")
    assert p4.backend == ("int4mm-cuda" if sm >= (8, 0) else "dequant")
    assert _rel(p4(x.cuda()).cpu(), x @ q4.dequantize().t()) < 2e-2
    q8 = quantize_weight(w, QuantSpec(bits=8, group_size=-1, symmetric=True))
    i8 = Int8Linear(q8, INT8_A, device="cuda")
    assert i8.kernel == ("int8-intmm" if sm >= (7, 5) else "int8-emulated")
    xc = x.cuda()  # references on the device: CPU and GPU may round a boundary input to different codes
    ref8 = torch.nn.functional.linear(
        InputQuantizer(QuantSpec(**INT8_A["spec"]), True)(None, (xc,))[0], q8.dequantize().cuda()
    )
    assert _rel(i8(xc), ref8) < 1e-5
    qf = quantize_weight(w, QuantSpec(bits=8, group_size=-1, symmetric=True, dtype="fp8"))
    if fp8_choice(qf, FP8_A, cap).reason is None:
        f8 = FP8Linear(qf, FP8_A, device="cuda")
        reff = torch.nn.functional.linear(
            InputQuantizer(QuantSpec(**FP8_A["spec"]), True)(None, (xc,))[0], qf.dequantize().cuda()
        )
        # fp8 tensor cores accumulate with fewer bits than float32 (an H200: 1.2-1.7e-4 of the largest output)
        assert f8.kernel == "fp8-scaled-mm" and _rel(f8(xc), reff) < FP8_GEMM_TOLERANCE
    else:
        assert sm < (8, 9)


def test_device_command_runs_here_and_refuses_a_bad_device():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "quantshift.cli", "device", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith("device: cpu") and "dtype auto:" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "quantshift.cli", "device", "--device", "gpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: --device must be auto, cpu, cuda or cuda:N, got 'gpu'"
