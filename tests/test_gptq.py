"""Layer-level quality: GPTQ must beat RTN on output error, in every grouping mode."""

import pytest
import torch

from quantshift.methods.gptq import HessianStats, accumulate_hessian, gptq_solve, hessian_error
from quantshift.quant.primitives import QuantSpec, fake_quantize_weight


def _layer_with_outliers(out_f=48, in_f=96, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g)
    x[:, :4] *= 20  # outlier input channels, as in real LLM activations
    x = x @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g) / in_f**0.5)  # correlated
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    return w, x


def _out_err(w, wq, x):
    return float(((x @ (wq - w).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    "gs,act_order,static",
    [
        (32, False, False),
        (64, False, False),
        (-1, False, False),
        (32, True, False),
        (32, True, True),
        (0, False, False),
    ],
)
def test_gptq_beats_rtn_on_output_error(bits, gs, act_order, static):
    w, x = _layer_with_outliers()
    stats = HessianStats(torch.zeros(w.shape[1], w.shape[1]))
    for chunk in x.split(256):
        accumulate_hessian(stats, chunk)
    spec = QuantSpec(bits=bits, group_size=gs)
    q, qw, _ = gptq_solve(w, stats.H, spec, act_order=act_order, static_groups=static)
    rtn = fake_quantize_weight(w, spec)
    e_gptq, e_rtn = _out_err(w, q, x), _out_err(w, rtn, x)
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)
    # the stored codes + qparams reproduce the returned weights exactly
    assert torch.allclose(qw.dequantize(), q, atol=1e-6)
    assert hessian_error(w, q, stats.H) == pytest.approx(e_gptq, rel=1e-3)


def test_hessian_is_running_mean_of_2xxT():
    x = torch.randn(100, 8)
    s = HessianStats(torch.zeros(8, 8))
    accumulate_hessian(s, x[:30])
    accumulate_hessian(s, x[30:])
    assert torch.allclose(s.H, 2 * x.t() @ x / 100, atol=1e-5)


def test_partial_groups_and_dead_columns():
    w, x = _layer_with_outliers(in_f=80)
    x[:, 10] = 0  # a dead input channel: its weights are irrelevant and zeroed
    H = 2 * x.t() @ x / x.shape[0]
    q, qw, _ = gptq_solve(w, H, QuantSpec(bits=3, group_size=64))
    assert qw.scale.shape == (w.shape[0], 2)
    assert torch.isfinite(q).all()


def test_act_order_records_group_index():
    w, x = _layer_with_outliers()
    H = 2 * x.t() @ x / x.shape[0]
    _, qw, _ = gptq_solve(w, H, QuantSpec(bits=4, group_size=32), act_order=True)
    assert qw.g_idx is not None and qw.g_idx.shape == (w.shape[1],)
    assert sorted(qw.g_idx.bincount().tolist()) == [32, 32, 32]
    _, qw_static, _ = gptq_solve(w, H, QuantSpec(bits=4, group_size=32), act_order=True, static_groups=True)
    assert qw_static.g_idx is None  # static groups keep the sequential layout


@pytest.mark.parametrize("gs,act_order", [(32, False), (32, True), (-1, False), (0, False)])
def test_linears_sharing_an_input_are_solved_as_one_stacked_problem(gs, act_order):
    """q/k/v (and gate/up) share H; GPTQ solves their stacked rows at once. Rows are independent
    given H, so each linear gets what solving it alone gives (up to float rounding ties)."""
    import torch.nn as nn

    from quantshift.methods.base import LinearPlan
    from quantshift.methods.gptq import GPTQ, GPTQConfig

    w, x = _layer_with_outliers(out_f=40)
    stats = HessianStats(torch.zeros(w.shape[1], w.shape[1]))
    accumulate_hessian(stats, x)
    linears = []
    for rows in (w[:24], w[24:32], w[32:]):
        lin = nn.Linear(w.shape[1], rows.shape[0], bias=False)
        lin.weight.data.copy_(rows)
        linears.append(lin)
    plan = LinearPlan(QuantSpec(bits=3, group_size=gs), None)
    method = GPTQ(GPTQConfig(wbits=3, group_size=gs, act_order=act_order))
    shared = method.solve_shared(["q", "k", "v"], linears, stats, plan)
    for name, lin, res in zip("qkv", linears, shared):
        alone = method.solve(name, lin, stats, plan)
        assert res.weight.shape == lin.weight.shape
        assert (res.qweight.codes == alone.qweight.codes).float().mean() > 0.99
        assert res.info["gptq_loss"] == pytest.approx(alone.info["gptq_loss"], rel=1e-3)
        assert torch.allclose(res.qweight.dequantize(), res.weight, atol=1e-6)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    from quantshift.quant.primitives import damped_inverse_cholesky

    w, x = _layer_with_outliers(in_f=70)
    H = 2 * x.t() @ x / x.shape[0]
    fac = damped_inverse_cholesky(H.clone(), 0.01)
    assert fac.ok and fac.damp == 0.01 and fac.steps == 0
    U = fac.factor
    damped = H + 0.01 * H.diag().mean() * torch.eye(70)
    assert torch.equal(U, U.triu()) and (U.diag() > 0).all()
    assert torch.allclose(U.t() @ U @ damped, torch.eye(70), atol=1e-3)


def test_fast_solver_equals_the_papers_algorithm_written_plainly():
    # benchmarks/quantize_speed.py times our solver against Algorithm 1 written plainly (the
    # baseline for "same per-layer error"); the speed-ups (transposed loop, one triangular
    # inverse, stacked rows) must not change the result
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quantize_speed.py"
    spec = importlib.util.spec_from_file_location("quantize_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 320, generator=g) * torch.linspace(0.1, 4, 320)
    H = 2 * X.t() @ X / X.shape[0]
    W = torch.randn(48, 320, generator=g)
    for bits, gs in [(4, 128), (3, 64), (2, 32)]:
        ours, _, _ = gptq_solve(W, H, QuantSpec(bits=bits, group_size=gs))
        plain = mod.gptq_textbook_solve(W, H, bits, gs)
        assert torch.allclose(ours, plain, atol=1e-4, rtol=0), (bits, gs, (ours - plain).abs().max())


def test_half_gram_call_is_well_formed():
    # the CUDA fast path of accumulate_hessian (16-bit activations, float32 Gram matrix); meta
    # tensors check the call's signature and result type on a machine without a GPU
    from quantshift.quant.primitives import half_gram

    x = torch.empty(64, 24, device="meta", dtype=torch.float16)
    got = half_gram(x)
    assert got.shape == (24, 24) and got.dtype == torch.float32


def test_hessian_from_bf16_activations_on_cpu_is_float32_and_positive_definite():
    # bf16 inputs (what a linear multiplies under autocast) with a massive channel and a strong
    # common mode, as LLM activations have: a bf16-output GEMM would round the Gram matrix into an
    # indefinite one; ours stays float32-accurate, so the damped matrix factors
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g) * torch.linspace(0.01, 1, 256) + 3 * torch.randn(4096, 1, generator=g)
    x[:, 7] *= 300
    x = x.bfloat16()
    ref = 2 * x.double().t() @ x.double() / x.shape[0]
    stats = HessianStats(torch.zeros(256, 256))
    for chunk in x.split(1024):
        accumulate_hessian(stats, chunk)
    assert stats.H.dtype == torch.float32 and stats.tokens == 4096
    d = ref.diagonal().sqrt()
    assert float(((stats.H.double() - ref).abs() / (d[:, None] * d[None, :])).max()) < 1e-5
    H = stats.H.clone()
    H.diagonal().add_(0.01 * H.diagonal().mean())
    torch.linalg.cholesky(H)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hessian_from_half_activations_on_cuda_matches_float64():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 256, generator=g) * torch.linspace(0.01, 30, 256)).half()
    ref = 2 * x.double().t() @ x.double() / x.shape[0]
    stats = HessianStats(torch.zeros(256, 256, device="cuda"))
    for chunk in x.cuda().split(1000):
        accumulate_hessian(stats, chunk)
    assert stats.tokens == 4096
    assert torch.allclose(stats.H.double().cpu(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
