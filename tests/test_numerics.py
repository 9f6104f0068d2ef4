"""Numerical robustness: damped Hessian factorization with stepwise damping and an RTN fallback,
NaN/inf checks naming the block and linear, and import guards that name the package."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import loaded_tiny, random_calib

from quantshift.errors import DependencyError, NumericalError, QuantshiftError
from quantshift.methods.base import plan_for
from quantshift.methods.gptq import GPTQ, GPTQConfig, HessianStats, accumulate_hessian, gptq_solve_rows
from quantshift.pipeline import numerics_line, quantize_model
from quantshift.quant.primitives import (
    DAMP_CAP,
    QuantSpec,
    damp_schedule,
    damped_inverse_cholesky,
    quantize_weight,
)
from quantshift.recipes import recipe_from_cli

# ---------------------------------------------------------------- the pure damping function


def test_damp_schedule_raises_tenfold_up_to_the_cap():
    assert damp_schedule(0.01) == pytest.approx([0.01, 0.1, 1.0])
    assert damp_schedule(0.0) == pytest.approx([0.0, 0.01, 0.1, 1.0])  # undamped: retry from GPTQ's 1%
    assert damp_schedule(0.5) == [0.5, 1.0]  # the last step stops at the cap
    assert damp_schedule(0.03) == pytest.approx([0.03, 0.3, 1.0])
    assert damp_schedule(1.0) == [1.0]
    assert damp_schedule(2.0) == [2.0]  # a configured damping above the cap is still tried


def _check_factor(H, fac):
    damped = H + fac.damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = fac.factor
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    assert torch.allclose(U.t() @ U @ damped, torch.eye(H.shape[0], dtype=H.dtype), atol=1e-4)


def test_damped_cholesky_keeps_the_configured_damping_when_it_suffices():
    H = torch.tensor([[4.0, 2.0, 0.0], [2.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    fac = damped_inverse_cholesky(H.clone(), 0.01)
    assert fac.ok and fac.damp == 0.01 and fac.steps == 0
    _check_factor(H, fac)


def test_damped_cholesky_raises_the_damping_of_a_singular_matrix():
    # two identical channels: exactly singular (the undamped pivot is 4 - 2*2 = 0 in any precision)
    H = torch.tensor([[4.0, 4.0, 0.0], [4.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    assert int(torch.linalg.cholesky_ex(H)[1]) != 0
    fac = damped_inverse_cholesky(H.clone(), 0.0)
    assert fac.ok and fac.damp == pytest.approx(0.01) and fac.steps == 1
    _check_factor(H, fac)
    # indefinite by 5% of the mean diagonal: 1% fails, 10% works
    H2 = torch.diag(torch.tensor([1.0, 1.0, -0.05]))  # lambda_min / mean diag = -0.077
    fac2 = damped_inverse_cholesky(H2.clone(), 0.01)
    assert fac2.ok and fac2.damp == pytest.approx(0.1) and fac2.steps == 1


def test_damped_cholesky_gives_up_on_a_negative_definite_or_nonfinite_matrix():
    H = -torch.tensor([[3.0, 1.0], [1.0, 2.0]])  # negative definite: damping only makes it worse
    fac = damped_inverse_cholesky(H.clone(), 0.01)
    assert not fac.ok and fac.factor is None
    assert fac.damp == pytest.approx(DAMP_CAP) and fac.steps == 2  # 0.01 -> 0.1 -> 1.0, all failed
    bad = torch.eye(3)
    bad[1, 2] = float("nan")
    assert not damped_inverse_cholesky(bad, 0.01).ok


# ---------------------------------------------------------------- solvers: raised damping, RTN fallback


def _planted_singular_stats(in_f: int = 16, tokens: int = 4) -> HessianStats:
    """Inputs with duplicated and all-zero channels and fewer tokens than channels: each live
    channel is 2 * e_t for some token t, so H (entries 0 or 4) is exactly singular and the
    undamped Cholesky meets an exact zero pivot."""
    x = torch.zeros(tokens, in_f)
    for j in range(in_f):
        if j % 5 != 4:  # every fifth channel dead
            x[j % tokens, j] = 2.0
    stats = HessianStats(torch.zeros(in_f, in_f))
    accumulate_hessian(stats, x)
    return stats


def _linear(out_f: int, in_f: int, seed: int = 0) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
    return lin


def test_gptq_on_a_planted_singular_hessian_raises_the_damping_and_records_it():
    stats = _planted_singular_stats()
    H = stats.H.clone()
    live = H.diagonal() > 0
    assert int(torch.linalg.cholesky_ex(H[live][:, live])[1]) != 0  # singular even without the dead channels
    cfg = GPTQConfig(wbits=4, group_size=8, damp=0.0)
    plan = plan_for(cfg, "model.layers.0.mlp.down_proj")
    lin = _linear(6, 16)
    res = GPTQ(cfg).solve("mlp.down_proj", lin, stats, plan)
    assert res.info["damp"] == pytest.approx(0.01) and res.info["damp_steps"] == 1 and res.info["fallback"] is None
    assert torch.isfinite(res.weight).all() and math.isfinite(res.info["gptq_loss"])
    # exactly GPTQ at the damping that worked
    ref = gptq_solve_rows(
        lin.weight.detach(), stats.H, plan.weight, 0.01, cfg.block_size, cfg.act_order, cfg.static_groups
    )
    assert torch.equal(res.weight, ref.weight)
    # linears sharing the input (q/k/v) are solved stacked; each records the same numerics
    shared = GPTQ(cfg).solve_shared(["a", "b"], [lin, _linear(4, 16, seed=1)], stats, plan)
    assert [(r.info["damp"], r.info["damp_steps"]) for r in shared] == [(res.info["damp"], 1)] * 2
    assert all(torch.isfinite(r.weight).all() for r in shared)


def _negative_stats(in_f: int = 32, seed: int = 0) -> HessianStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, in_f, generator=g)
    return HessianStats(-2 * x.t() @ x / 64, 64)  # negative definite: no damping can fix it


def test_gptq_falls_back_to_exactly_rtn_when_no_damping_helps():
    from quantshift.methods.rtn import RTN, RTNConfig

    stats = _negative_stats()
    cfg = GPTQConfig(wbits=3, group_size=16)
    plan = plan_for(cfg, "model.layers.0.mlp.down_proj")
    lin = _linear(8, 32)
    res = GPTQ(cfg).solve("mlp.down_proj", lin, stats, plan)
    assert res.info["fallback"] == "rtn" and res.info["damp"] == pytest.approx(DAMP_CAP)
    assert "gptq_loss" not in res.info  # no Hessian-weighted proxy loss without a factor
    rtn = RTN(RTNConfig(wbits=3, group_size=16)).solve("mlp.down_proj", lin, None, plan)
    assert torch.equal(res.weight, rtn.weight)
    assert torch.equal(res.qweight.codes, rtn.qweight.codes) and torch.equal(res.qweight.scale, rtn.qweight.scale)
    # stacked linears fall back one by one, each to its own RTN
    lin2 = _linear(5, 32, seed=3)
    shared = GPTQ(cfg).solve_shared(["a", "b"], [lin, lin2], stats, plan)
    assert [r.info["fallback"] for r in shared] == ["rtn", "rtn"]
    assert torch.equal(shared[1].weight, quantize_weight(lin2.weight.detach(), plan.weight).dequantize())


def test_spqr_and_quip_fall_back_to_nearest_rounding_on_their_own_grids():
    from quantshift.methods.quip import QuIP, QuIPConfig
    from quantshift.methods.spqr import SpQR, SpQRConfig

    stats = _negative_stats()
    lin = _linear(16, 32)
    W = lin.weight.detach()
    scfg = SpQRConfig(wbits=3, group_size=16)
    res = SpQR(scfg).solve("mlp.down_proj", lin, stats, plan_for(scfg, "model.layers.0.mlp.down_proj"))
    assert res.info["fallback"] == "rtn" and res.info["outliers"] == 0
    scale, zero = res.qweight.column_params()
    # every weight sits on the grid point nearest to its original value (no error feedback)
    assert torch.equal(res.qweight.codes.float(), torch.clamp(torch.round(W / scale + zero), 0, 7))

    qcfg = QuIPConfig(wbits=2)
    plan = plan_for(qcfg, "model.layers.0.mlp.down_proj")
    quip = QuIP(qcfg).solve("mlp.down_proj", lin, stats, plan)
    nearest = QuIP(QuIPConfig(wbits=2, rounding="nearest")).solve("mlp.down_proj", lin, stats, plan)
    assert quip.info["fallback"] == "rtn"
    assert torch.equal(quip.weight, nearest.weight)  # nearest rounding in the rotated basis


def test_negative_damping_is_rejected():
    with pytest.raises(ValueError, match="damp must be a number >= 0"):
        GPTQConfig(damp=-0.01)


# ---------------------------------------------------------------- end to end: report and summary line

WIDE = 160  # the tiny models' intermediate size: only mlp.down_proj sees inputs this wide


def _broken_down_proj_hessians(monkeypatch) -> None:
    """Block 0's down_proj gets a Hessian indefinite by ~5% of its mean diagonal (1% damping fails,
    10% works: the calibration set has fewer tokens than channels, so x^T x is singular); block 1's
    gets a negative definite one (no damping helps)."""
    import quantshift.methods.gptq as gptq_mod

    real = gptq_mod.gram
    calls = []

    def gram(x):
        G = real(x)
        if x.shape[1] != WIDE:
            return G
        calls.append(1)
        if len(calls) == 1:
            return G - 0.05 * G.diagonal().mean() * torch.eye(WIDE)
        return -G - G.diagonal().mean() * torch.eye(WIDE)

    monkeypatch.setattr(gptq_mod, "gram", gram)


def test_engine_records_damping_and_rtn_fallback_and_prints_one_line(monkeypatch, capsys):
    from quantshift.methods.rtn import RTN, RTNConfig

    _broken_down_proj_hessians(monkeypatch)
    lm = loaded_tiny("llama")
    original = lm.model.model.layers[1].mlp.down_proj.weight.detach().clone()
    calib = random_calib(n=2, seqlen=32)  # 64 tokens < 160 channels
    res = quantize_model(lm, recipe_from_cli("gptq", wbits=4, group_size=32), calib, progress=False)
    report = res.report()
    mods = report["modules"]
    d0, d1 = mods["model.layers.0.mlp.down_proj"], mods["model.layers.1.mlp.down_proj"]
    assert d0["damp"] == pytest.approx(0.1) and d0["damp_steps"] == 1 and d0["fallback"] is None
    assert d1["fallback"] == "rtn"
    others = [m for n, m in mods.items() if "down_proj" not in n]
    assert len(others) == 12 and all(m["damp"] == 0.01 and m["fallback"] is None for m in others)
    # the fallen-back linear holds exactly what RTN makes of it
    spec = QuantSpec(bits=4, group_size=32)
    lin = torch.nn.Linear(original.shape[1], original.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(original)
    rcfg = RTNConfig(wbits=4, group_size=32)
    rtn = RTN(rcfg).solve("mlp.down_proj", lin, None, plan_for(rcfg, "model.layers.1.mlp.down_proj"))
    assert torch.equal(lm.model.model.layers[1].mlp.down_proj.weight, rtn.weight)
    assert torch.equal(
        res.engine.modules["model.layers.1.mlp.down_proj"].qweight.codes, quantize_weight(original, spec).codes
    )
    assert report["numerics"] == {
        "linears": 14,
        "damp_raised": {"model.layers.0.mlp.down_proj": pytest.approx(0.1)},
        "fallback_rtn": ["model.layers.1.mlp.down_proj"],
    }
    json.dumps(report["numerics"])  # plain JSON for the saved report and the study cache
    err = capsys.readouterr().err.strip().splitlines()
    line = (
        "1 of 14 linears needed more damping (up to 0.1 of the mean Hessian diagonal); "
        "1 fell back to RTN: model.layers.1.mlp.down_proj"
    )
    assert err == [line]


def test_numerics_line_is_quiet_when_nothing_happened_and_short_when_much_did():
    assert numerics_line(None) is None
    assert numerics_line({"linears": 3, "damp_raised": {}, "fallback_rtn": []}) is None
    many = {"linears": 9, "damp_raised": {}, "fallback_rtn": [f"l{i}" for i in range(8)]}
    assert numerics_line(many) == (
        "0 of 9 linears needed more damping; 8 fell back to RTN: l0, l1, l2, l3, l4 and 3 more"
    )


def test_study_keeps_the_numerics_in_the_quant_record_and_the_report(monkeypatch, tmp_path):
    from quantshift.studies.runner import run_study
    from quantshift.studies.spec import study_from_dict

    _broken_down_proj_hessians(monkeypatch)
    lm = loaded_tiny("llama")
    model_dir = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "prose.txt"
    text.write_text(
        "\n\n".join(f"{i} The river bends slowly past the old mill, where farmers bring grain. " * 3 for i in range(25))
    )
    spec = {
        "name": "numerics",
        "models": [str(model_dir)],
        "device": "cpu",
        "methods": [{"method": "gptq", "wbits": [4], "group_size": 32}],
        "calibration": {"sources": [str(text)], "n": 2, "seqlen": 32, "seeds": [42]},
        "evaluation": {"ppl": [str(text)], "ppl_seqlen": 32, "ppl_windows": 2},
        "diagnostics": {"enabled": False},
    }
    run_study(study_from_dict(spec), tmp_path / "out", tmp_path / "cache", progress=False, echo=lambda *_: None)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    cell = next(c for c in res["cells"] if c["method"] == "gptq")
    assert cell["numerics"]["fallback_rtn"] == ["model.layers.1.mlp.down_proj"]
    assert list(cell["numerics"]["damp_raised"]) == ["model.layers.0.mlp.down_proj"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "1 fell back to RTN: model.layers.1.mlp.down_proj" in report


# ---------------------------------------------------------------- NaN / inf


def test_nan_in_calibration_inputs_names_the_block_and_linear():
    lm = loaded_tiny("llama")
    with torch.no_grad():
        lm.model.model.layers[1].input_layernorm.weight[5] = float("nan")  # block 1's q/k/v inputs
    with pytest.raises(
        NumericalError,
        match=r"model\.layers\.1\.self_attn\.q_proj \(block 1, stage gptq\) "
        r"contain NaN/inf",
    ) as info:
        quantize_model(lm, recipe_from_cli("gptq", wbits=4, group_size=32), random_calib(n=2), progress=False)
    assert isinstance(info.value, QuantshiftError) and "\n" not in str(info.value)


def test_nonfinite_solved_weights_name_the_linear():
    lm = loaded_tiny("llama")
    with torch.no_grad():
        lm.model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    what = r"stage gptq solved NaN/inf weights for model\.layers\.0\.self_attn\.o_proj \(block 0\)"
    with pytest.raises(NumericalError, match=what):
        quantize_model(lm, recipe_from_cli("gptq", wbits=4, group_size=32), random_calib(n=2), progress=False)


def test_nonfinite_block_outputs_and_embeddings_stop_the_run():
    recipe = recipe_from_cli("gptq", wbits=4, group_size=32)
    lm = loaded_tiny("llama")
    # the last block's outputs (no later linear would see them), with every linear input finite
    lm.model.model.layers[1].register_forward_hook(
        lambda _m, _a, out: (out[0] * float("inf"),) + tuple(out[1:]) if isinstance(out, tuple) else out * float("inf")
    )
    with pytest.raises(NumericalError, match=r"block 1 \(model\.layers\.1\) outputs NaN/inf"):
        quantize_model(lm, recipe, random_calib(n=2), progress=False)
    lm = loaded_tiny("llama")
    with torch.no_grad():
        lm.model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"calibration inputs of block 0 \(model\.layers\.0\) contain NaN/inf"):
        quantize_model(lm, recipe, random_calib(n=2), progress=False)


# ---------------------------------------------------------------- import guards


def _fake_package(tmp_path, monkeypatch, name: str, body: str) -> None:
    pkg = tmp_path / "fakes" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path / "fakes"))
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, mod)


def test_missing_optional_extra_says_what_to_install(monkeypatch):
    from quantshift.studies.executors import RaySettings, connect_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` -> ModuleNotFoundError(name="ray")
    what = r"the ray executor needs the 'ray' package: pip install 'quantshift\[ray\]'"
    with pytest.raises(DependencyError, match=what):
        connect_ray(RaySettings(), "cpu")


@pytest.mark.parametrize(
    "body,own",
    [
        ("import grpc_not_here_xyz\n", "No module named 'grpc_not_here_xyz'"),  # a dependency of ray missing
        ("raise ImportError('libray.so: undefined symbol: foo')\n", "undefined symbol: foo"),  # a bad build
    ],
)
def test_broken_optional_extra_is_not_reported_as_missing(tmp_path, monkeypatch, body, own):
    from quantshift.studies.executors import RaySettings, connect_ray

    _fake_package(tmp_path, monkeypatch, "ray", body)
    with pytest.raises(DependencyError) as info:
        connect_ray(RaySettings(), "cpu")
    msg = str(info.value)
    assert "'ray' is installed but cannot be imported" in msg and own in msg and "needs the 'ray' package" not in msg
    assert isinstance(info.value.__cause__, ImportError)  # the original error stays attached


def test_broken_required_dependency_is_raised_with_its_own_message(monkeypatch):
    from quantshift.data import sources
    from quantshift.studies.keys import code_versions

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="lm_eval"):
        code_versions()  # once silently left out of every cache key
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="datasets"):
        sources._hf("wikitext", "wikitext-2-raw-v1", "test")
