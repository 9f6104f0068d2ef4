"""Strict configs: typos and bad values fail with a message naming the problem."""

import pytest

from quantshift.errors import ConfigError
from quantshift.methods.base import plan_for
from quantshift.recipes import recipe_from_cli, recipe_from_dict


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"unknown key 'wbit' \(allowed: .*wbits"):
        recipe_from_dict({"stages": [{"gptq": {"wbit": 4}}]})


def test_unknown_method_lists_methods():
    with pytest.raises(ConfigError, match=r"unknown method 'gptqq'; allowed: .*gptq.*rtn"):
        recipe_from_dict([{"gptqq": {}}])


@pytest.mark.parametrize("bits", [1, 9, 17])
def test_wrong_bit_width(bits):
    with pytest.raises(ConfigError, match="wbits must be 2..8"):
        recipe_from_cli("rtn", wbits=bits)


def test_bad_regex_and_bad_recipe_shapes():
    with pytest.raises(ConfigError, match="invalid regex"):
        recipe_from_dict([{"rtn": {"overrides": [{"pattern": "(["}]}}])
    with pytest.raises(ConfigError, match="non-empty list"):
        recipe_from_dict({"stages": []})
    with pytest.raises(ConfigError, match="unknown key 'stage'"):
        recipe_from_dict({"stage": [{"rtn": {}}]})


def test_plan_resolution_order():
    rec = recipe_from_dict(
        [{"gptq": {"wbits": 3, "overrides": [{"pattern": "down_proj", "wbits": 8, "group_size": -1}]}}]
    )
    cfg = rec.stages[0].config
    assert plan_for(cfg, "model.layers.0.mlp.down_proj").weight.bits == 8
    assert plan_for(cfg, "model.layers.0.mlp.down_proj").weight.group_size == -1
    assert plan_for(cfg, "model.layers.0.mlp.up_proj").weight.bits == 3
    assert plan_for(cfg, "lm_head") is None  # ignored by default


def test_callers_config_not_mutated():
    data = [{"gptq": {"wbits": 3, "overrides": [{"pattern": "x", "wbits": 8}]}}]
    import copy

    before = copy.deepcopy(data)
    recipe_from_dict(data)
    assert data == before


def test_granularity_labels_name_the_group_size_sentinels():
    from quantshift.config import PER_CHANNEL, PER_TENSOR, granularity, grouped
    from quantshift.quant.primitives import QuantSpec

    assert [granularity(g) for g in (PER_CHANNEL, PER_TENSOR, 128)] == ["per-channel", "per-tensor", "g128"]
    assert (PER_CHANNEL, PER_TENSOR) == (-1, 0) and grouped(64) and not grouped(PER_CHANNEL) and not grouped(PER_TENSOR)
    assert QuantSpec(bits=4, group_size=-1).describe() == "4bit asym per-channel"
    assert QuantSpec(bits=8, group_size=0, symmetric=True).describe() == "8bit sym per-tensor"
    assert QuantSpec(bits=3, group_size=64).describe() == "3bit asym g64"


def test_recipe_labels_keep_their_format():
    """Unquantized activations (abits 16) and ungrouped weights print nothing; groups print gN."""
    rec = recipe_from_dict(
        [{"rtn": {"wbits": 4, "group_size": 128}}, {"smoothquant": {"wbits": 8, "abits": 8, "group_size": -1}}]
    )
    assert rec.describe() == "rtn(w4g128) -> smoothquant(w8a8)"
    assert recipe_from_dict([{"rtn": {"wbits": 4, "group_size": 0}}]).describe() == "rtn(w4)"
    plan = plan_for(
        recipe_from_dict([{"rtn": {"wbits": 16, "abits": 8}}]).stages[0].config, "model.layers.0.mlp.up_proj"
    )
    assert plan is not None and plan.weight is None and plan.act is not None and plan.act.group_size == 0


def test_every_method_config_reads_back_from_its_dump():
    """A study ships recipes to its works as dicts (Recipe.to_dict): each method's dumped config,
    defaults included, must read back as the same recipe (fp8 once refused its own dump)."""
    from quantshift.methods import METHODS
    from quantshift.recipes import recipe_from_dict

    for name in METHODS.names():
        rec = recipe_from_dict([{name: {}}])
        assert recipe_from_dict(rec.to_dict()).to_dict() == rec.to_dict(), name


@pytest.mark.parametrize(
    "template",
    [
        "must be 2..8 (or",  # wbits (config.wbits_rule: stage configs, overrides, --wbits)
        "must be 4..8 (or",  # abits
        "must be -1 (per channel)",  # group_size
        "must be an integer {lo}..{hi}",  # counts, sizes, seeds (config.integer_rule: configs, studies, CLI)
        "must be a number {bound}",  # a method's numeric options, Ray's (config.number_rule)
        "invalid regex",  # targets, ignore, override patterns (methods.base.regex_rule)
        "does not apply to {",  # options a method does not take (StageConfig.not_applicable)
        "is a 2-4 bit method",  # QuIP's bits, stage and overrides
        "needs small groups",  # SpQR's group size, stage and overrides
    ],
)
def test_each_rule_is_stated_in_one_place(template):
    """Each rule's message is written once in src: every input that can break it (a stage config,
    its per-layer overrides, a CLI option, a study) goes through that one rule."""
    from pathlib import Path

    import quantshift

    root = Path(quantshift.__file__).parent
    places = [f"{p.relative_to(root)}" for p in sorted(root.rglob("*.py")) if template in p.read_text()]
    count = sum(p.read_text().count(template) for p in root.rglob("*.py"))
    assert count == 1, f"{template!r} stated {count} times: {places}"
