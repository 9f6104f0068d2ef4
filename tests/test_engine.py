"""The block engine end to end on tiny in-memory models (random weights, seconds on CPU)."""

import json

import pytest
import torch
from conftest import loaded_tiny, logits, random_calib

from quantshift.checkpoint import load_quantized
from quantshift.errors import ModelError
from quantshift.pipeline import quantize_model, save
from quantshift.recipes import recipe_from_cli, recipe_from_dict

EVAL_IDS = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(7))


def _rel_logit_err(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def _quantized_err(kind, method, wbits, gs=32, calib=None, seed=0, **opts):
    fp = loaded_tiny(kind, seed)
    ref = logits(fp.model, EVAL_IDS)
    lm = loaded_tiny(kind, seed)
    res = quantize_model(
        lm, recipe_from_cli(method, wbits=wbits, group_size=gs, **opts), calib or random_calib(), progress=False
    )
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
    rec = recipe_from_dict(
        {
            "stages": [
                {
                    "gptq": {
                        "wbits": 3,
                        "group_size": 32,
                        "overrides": [
                            {"pattern": r"layers\.0\.mlp\.down_proj", "wbits": 8},
                            {"pattern": r"layers\.1\.self_attn\.o_proj", "skip": True},
                        ],
                    }
                }
            ]
        }
    )
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
    shard = out / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="model-00001-of-00001.safetensors does not match its sha256"):
        load_quantized(out, torch.float32, "cpu")
    shard.write_bytes(bytes(data[:-100]))  # truncated: found from the header alone, before any read
    with pytest.raises(ModelError, match="model-00001-of-00001.safetensors is truncated"):
        load_quantized(out, torch.float32, "cpu", verify=False)
    shard.unlink()
    with pytest.raises(ModelError, match="missing model-00001-of-00001.safetensors"):
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
    quantize_model(
        loaded_tiny("llama"), recipe_from_cli("gptq", wbits=4, group_size=32), random_calib(), progress=False
    )
    assert len(calls) == 2 * 4  # per block: one for q/k/v, o, gate/up, down


# ---------------------------------------------------------------- fp propagation and the statistics cache


def _gptq(bits: int):
    return recipe_from_dict([{"gptq": {"wbits": bits, "group_size": 32}}])


def _no_forward(monkeypatch):
    """Any calibration forward pass from here on fails the test."""
    from quantshift.quant.engine import BlockEngine

    def refuse(self, *a, **k):
        raise AssertionError("a calibration forward pass ran")

    monkeypatch.setattr(BlockEngine, "capture", refuse)


def test_cached_hessians_give_a_new_bit_width_without_any_forward_pass(tmp_path, monkeypatch):
    from quantshift.quant.statstore import StatsStore

    calib = random_calib(n=4, seqlen=32)
    store = StatsStore(tmp_path / "stats", "tiny-llama")
    quantize_model(loaded_tiny(), _gptq(4), calib, propagate="fp", stats_store=store, progress=False)
    assert len(list((tmp_path / "stats").rglob("block-*.safetensors"))) == 2
    fresh = loaded_tiny()
    quantize_model(fresh, _gptq(3), calib, propagate="fp", progress=False)  # computes its own Hessians
    _no_forward(monkeypatch)
    cached = loaded_tiny()
    res = quantize_model(cached, _gptq(3), calib, propagate="fp", stats_store=store, progress=False)
    assert all(b.get("statistics") == "cached" for b in res.engine.blocks)
    for a, b in zip(fresh.model.parameters(), cached.model.parameters()):
        assert torch.equal(a, b)  # the same Hessians, so the very same weights
    assert res.report()["propagate"] == "fp"


def test_a_union_of_calibration_sets_reuses_its_parts_statistics(tmp_path, monkeypatch):
    """H is a mean over tokens, so the union's H is the token-weighted mean of its parts' H."""
    from quantshift.data.calibset import union_calibset
    from quantshift.quant.statstore import CalibIdentity, StatsStore

    a, b = random_calib(n=4, seqlen=32, seed=1), random_calib(n=2, seqlen=32, seed=2)
    both = union_calibset([a, b])
    assert both.manifest.n == 6 and [p["sha256"] for p in both.manifest.parts] == [a.manifest.sha256, b.manifest.sha256]
    direct = StatsStore(tmp_path / "direct", "m")
    quantize_model(loaded_tiny(), _gptq(4), both, propagate="fp", stats_store=direct, progress=False)
    store = StatsStore(tmp_path / "parts", "m")
    for part in (a, b):
        quantize_model(loaded_tiny(), _gptq(4), part, propagate="fp", stats_store=store, progress=False)
    _no_forward(monkeypatch)
    quantize_model(loaded_tiny(), _gptq(3), both, propagate="fp", stats_store=store, progress=False)
    ident = CalibIdentity.of(both.manifest)
    for block in (0, 1):
        mixed, ref = store.load_block(ident, block), direct.load_block(ident, block)
        assert set(mixed) == set(ref)
        for name in ref:
            assert mixed[name][1] == ref[name][1] == 6 * 32
            assert torch.allclose(mixed[name][0], ref[name][0], rtol=1e-4, atol=1e-6)


def test_fp_propagation_calibrates_on_unquantized_activations():
    """Block 1's statistics under fp propagation equal those of an fp model (block 0 quantized or not)."""
    calib = random_calib(n=4, seqlen=32)
    seen: dict[str, torch.Tensor] = {}

    from quantshift.methods.gptq import GPTQ

    original = GPTQ.solve_shared

    def spy(self, names, linears, stats, plan):
        seen.setdefault(f"{self.config.wbits}:{names[0]}:{id(linears[0])}", stats.H.clone())
        return original(self, names, linears, stats, plan)

    GPTQ.solve_shared = spy
    try:
        m2, m4 = loaded_tiny(), loaded_tiny()
        quantize_model(m2, _gptq(2), calib, propagate="fp", progress=False)
        quantize_model(m4, _gptq(4), calib, propagate="fp", progress=False)
    finally:
        GPTQ.solve_shared = original
    h2 = [h for k, h in seen.items() if k.startswith("2:")]
    h4 = [h for k, h in seen.items() if k.startswith("4:")]
    assert len(h2) == len(h4) == 8  # 2 blocks x (qkv, o, gate/up, down)
    for x, y in zip(h2, h4):
        assert torch.equal(x, y)  # W2 and W4 saw the same inputs in every block


def test_a_statistics_cache_needs_fp_propagation(tmp_path):
    from quantshift.errors import ConfigError
    from quantshift.quant.statstore import StatsStore

    with pytest.raises(ConfigError, match="fp propagation"):
        quantize_model(loaded_tiny(), _gptq(4), random_calib(), stats_store=StatsStore(tmp_path, "m"), progress=False)


@pytest.mark.parametrize("propagate", ["quantized", "fp"])
def test_one_pass_statistics_share_only_truly_shared_inputs(propagate):
    """Observing every linear of a block in one pass (true_sequential off, or fp propagation):
    q/k/v share one Hessian and gate/up another, even when gate/up's input reuses the memory of
    q/k/v's freed input."""
    from quantshift.methods.gptq import GPTQ

    batches: list[list[str]] = []
    original = GPTQ.solve_shared

    def spy(self, names, linears, stats, plan):
        batches.append([n.split(".")[-1] for n in names])
        return original(self, names, linears, stats, plan)

    GPTQ.solve_shared = spy
    try:
        rec = recipe_from_dict([{"gptq": {"wbits": 4, "group_size": 32, "true_sequential": False}}])
        quantize_model(loaded_tiny(), rec, random_calib(n=4, seqlen=32), propagate=propagate, progress=False)
    finally:
        GPTQ.solve_shared = original
    assert sorted(map(tuple, batches[:4])) == [
        ("down_proj",),
        ("gate_proj", "up_proj"),
        ("o_proj",),
        ("q_proj", "k_proj", "v_proj"),
    ]


def test_activations_stay_on_the_gpu_only_when_they_fit_easily():
    from quantshift.quant.engine import activation_home

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    gib = 2**30
    assert activation_home("auto", gpu, 4 * gib, 70 * gib) == gpu  # a 7B layer's 128 x 2048 tokens on an H100
    assert activation_home("auto", gpu, 4 * gib, 12 * gib) == cpu  # more than a quarter of what is free
    assert activation_home("device", gpu, 4 * gib, 1 * gib) == gpu  # the user's choice wins
    assert activation_home("offload", gpu, 1, 70 * gib) == cpu
    assert activation_home("auto", cpu, 1, None) == cpu
    with pytest.raises(ValueError, match="activations must be one of auto, device, offload"):
        activation_home("gpu", gpu, 1, 1)
    with pytest.raises(ValueError, match="activations must be one of"):
        quantize_model(loaded_tiny("llama"), recipe_from_cli("rtn", wbits=4), None, activations="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_gpu_engine_matches_cpu_wherever_activations_live(kind):
    # blocks go to the GPU one at a time; activations stay there or go to pinned CPU memory
    cpu = loaded_tiny(kind)
    quantize_model(cpu, recipe_from_cli("gptq", wbits=4, group_size=32), random_calib(), progress=False)
    ref = logits(cpu.model, EVAL_IDS)
    for mode in ("device", "offload", "auto"):
        lm = loaded_tiny(kind)
        res = quantize_model(
            lm,
            recipe_from_cli("gptq", wbits=4, group_size=32),
            random_calib(),
            device="cuda",
            progress=False,
            activations=mode,
        )
        assert next(lm.model.parameters()).device.type == "cpu"  # blocks went back home
        assert all(b["out_rel_err"] < 0.1 for b in res.engine.blocks)
        assert _rel_logit_err(logits(lm.model, EVAL_IDS), ref) < 1e-3, mode


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "recipe",
    [
        {"gptq": {"wbits": 3, "group_size": 16}},
        {"gptq": {"wbits": 4, "group_size": 16, "abits": 8}},
        [{"smoothquant": {"alpha": 0.5, "quantize": False}}, {"gptq": {"wbits": 3}}],
    ],
)
def test_replaying_finished_sub_modules_changes_nothing_and_skips_attention(kind, recipe):
    # FrozenOutputs: once q/k/v/o are solved, the MLP passes and the propagation pass replay the
    # attention output; the result must be bit-identical to recomputing it, with fewer forwards
    from quantshift.quant.engine import BlockEngine

    stages = recipe if isinstance(recipe, list) else [recipe]
    rec = recipe_from_dict({"stages": stages})
    results, calls = {}, {}
    for reuse in (False, True):
        lm = loaded_tiny(kind)
        n = [0]
        for blk in lm.arch.blocks(lm.model):
            blk.self_attn.register_forward_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        eng = BlockEngine(
            lm.model, lm.arch, [s.build() for s in rec.stages], "cpu", batch_size=2, progress=False, reuse_outputs=reuse
        )
        eng.run(random_calib(6, 24).input_ids)
        results[reuse] = {k: v.clone() for k, v in lm.model.state_dict().items()}
        calls[reuse] = n[0]
    assert all(torch.equal(results[False][k], results[True][k]) for k in results[False])
    assert calls[True] < calls[False]


def test_methods_see_the_engine_only_through_the_block_context():
    """Methods get a BlockContext (methods.base), which the engine's EngineContext implements; no
    method reaches around it into the engine."""
    import inspect

    from quantshift.methods import METHODS
    from quantshift.methods.base import BlockContext
    from quantshift.quant.engine import EngineContext

    members = {n for n in vars(BlockContext) if not n.startswith("_")} | set(BlockContext.__annotations__)
    assert "engine" not in members and {"caches_stats", "fp_inputs", "later_stages", "commit"} <= members
    attributes = {"index", "block", "prefix"}  # set per instance by EngineContext.__init__
    assert all(hasattr(EngineContext, m) for m in members - attributes)
    import quantshift.methods.base as base

    for module in {base, *(inspect.getmodule(cls) for _, cls in METHODS.items())}:
        assert "ctx.engine" not in inspect.getsource(module), module.__name__
