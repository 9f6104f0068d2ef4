"""Stage composition: a transform stage changes what the next stage sees, and the engine applies
stages in recipe order (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded_tiny, random_calib

from quantshift.pipeline import quantize_model
from quantshift.quant.engine import BlockEngine
from quantshift.recipes import recipe_from_dict


def _run(kind: str, stages: list, calib=None, seed: int = 0):
    lm = loaded_tiny(kind, seed)
    res = quantize_model(lm, recipe_from_dict({"stages": stages}), calib or random_calib(), progress=False)
    return lm, res


# --- composition: a transform stage changes what the next stage sees ---------------------


def _block_weights(model, i: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.layers[i].state_dict().items()}


@pytest.mark.parametrize(
    "transform",
    [
        {"smoothquant": {"alpha": 0.8, "quantize": False}},
        {"awq": {"wbits": 4, "group_size": 32, "quantize": False}},
    ],
)
def test_transform_then_gptq_equals_gptq_on_transformed_model(transform):
    gptq = {"gptq": {"wbits": 4, "group_size": 32, "abits": 8}}
    calib = random_calib()
    stacked, _ = _run("llama", [transform, gptq], calib)

    # transform a copy over the whole model first, then run GPTQ alone on it
    two_pass = loaded_tiny("llama")
    quantize_model(two_pass, recipe_from_dict({"stages": [transform]}), calib, progress=False)
    quantize_model(two_pass, recipe_from_dict({"stages": [gptq]}), calib, progress=False)
    plain, _ = _run("llama", [gptq], calib)

    a, b, c = _block_weights(stacked.model), _block_weights(two_pass.model), _block_weights(plain.model)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert any(not torch.allclose(a[k], c[k], atol=1e-3) for k in a)  # the transform mattered
    # later blocks differ only because the stack smooths block 1 on the *quantized* block 0's
    # outputs (sequential quantization), while the two-pass copy smoothed it on fp outputs


def test_stages_see_each_others_results():
    # GPTQ after smoothing collects its Hessian on smoothed inputs: a different solution
    calib = random_calib()
    lm, res = _run("llama", [{"smoothquant": {"quantize": False}}, {"gptq": {"wbits": 4, "group_size": 32}}], calib)
    entry = res.engine.modules["model.layers.0.self_attn.q_proj"]
    assert entry.stage == "gptq" and entry.qweight is not None and entry.act is None


def test_engine_alone_applies_stages_in_order():
    lm = loaded_tiny("llama")
    stages = recipe_from_dict({"stages": [{"smoothquant": {"quantize": False}}, {"zeroquant": {}}]})
    eng = BlockEngine(lm.model, lm.arch, [s.build() for s in stages.stages], "cpu", progress=False)
    res = eng.run(random_calib().input_ids)
    assert {m.stage for m in res.modules.values()} == {"zeroquant"}


def test_a_transform_only_stack_reads_back_what_it_dumps():
    """A study hands each worker its recipe as a dict (Recipe.to_dict, defaults included); a
    smoothing-only SmoothQuant stage once failed to read back ("quantizes nothing"), so every
    SmoothQuant -> GPTQ cell of a study failed though `quantshift check` passed it."""
    import pytest

    from quantshift.errors import ConfigError

    firsts = ({"smoothquant": {"alpha": 0.5, "quantize": False}}, {"awq": {"quantize": False}})
    for first in firsts + ({"smoothquant": {"act_static": True}},):  # static W8A8: act_per_token follows
        rec = recipe_from_dict([first, {"gptq": {"wbits": 4, "group_size": 128}}])
        again = recipe_from_dict(rec.to_dict()["stages"])
        assert again.to_dict() == rec.to_dict() and again.digest() == rec.digest()
    # what the rule is for still fails: activation bits or static scales on a stage that quantizes nothing
    for bad in ({"abits": 4}, {"abits": 8}, {"act_static": True, "act_per_token": False}):
        with pytest.raises(ConfigError, match="quantizes nothing"):
            recipe_from_dict([{"smoothquant": {"quantize": False, **bad}}])
