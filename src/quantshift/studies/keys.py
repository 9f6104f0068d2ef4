"""Cache keys of a study: what identifies a calibration set, a quantized model, an evaluation.

Every key is a digest of everything that can change the artifact (model files, recipe,
calibration choice, code versions), so equal keys mean reusable results.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..config import user_path
from .spec import CalibChoice, Cell, EvalUnit, ModelAxis, StudySpec, digest

CACHE_SCHEMA = 3  # bump when a cached artifact's meaning changes (3: --dtype auto means bf16 autocast on bf16 CPUs)


def code_versions() -> dict[str, str]:
    """Versions that can change a result; part of every cache key."""
    import lm_eval  # a dependency: a broken install must fail here, not drop out of the cache keys
    import transformers

    from ..version import __version__

    return {
        "quantshift": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "schema": str(CACHE_SCHEMA),
        "lm_eval": getattr(lm_eval, "__version__", "?"),
    }


def model_identity(model: ModelAxis) -> dict:
    """Name and dtype, plus a fingerprint of a local directory's config and weight files."""
    ident: dict[str, Any] = {"name": model.name, "dtype": model.dtype}
    p = user_path(model.name)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                h.update(f.name.encode())
                h.update(f.read_bytes() if f.stat().st_size < (1 << 24) else str(f.stat().st_size).encode())
        ident["fingerprint"] = h.hexdigest()[:16]
    return ident


def calib_key(model: ModelAxis, calib: CalibChoice, versions: dict) -> str:
    """The calibration token ids' key: how blocks are then propagated does not change them."""
    choice = {k: v for k, v in calib.to_dict().items() if k != "propagate"}
    return digest({"model": model_identity(model), "calib": choice, "quantshift": versions["quantshift"]})


def quant_key(cell: Cell, versions: dict) -> str:
    uses_calib = bool(cell.calib and cell.recipe and cell.recipe.needs_calibration)
    ck = calib_key(cell.model, cell.calib, versions) if uses_calib else None  # type: ignore[arg-type]
    key = {
        "model": model_identity(cell.model),
        "recipe": cell.recipe.to_dict() if cell.recipe else None,
        "calib": ck,
        "versions": versions,
    }
    if uses_calib and cell.calib.propagate != "quantized":  # type: ignore[union-attr]
        key["propagate"] = cell.calib.propagate  # type: ignore[union-attr]
    return digest(key)


def unit_settings(spec: StudySpec, unit: EvalUnit) -> dict:
    ev = spec.evaluation
    if unit.kind == "ppl":
        from ..evaluation.scoring import PPL_SCORER

        return {
            "kind": "ppl",
            "source": unit.name,
            "seqlen": ev.ppl_seqlen,
            "windows": ev.ppl_windows,
            "scorer": PPL_SCORER,
        }
    from ..evaluation.harness import SCORER
    from ..evaluation.tasks import fixed_shots

    settings = {
        "kind": "task",
        "task": unit.name,
        "shots": unit.shots,
        "limit": ev.limit,
        "seed": 1234,
        "scorer": SCORER,
    }
    own = fixed_shots(unit.name, ev.suite)
    if own is not None:  # such results were once filed under the study's shots whatever they ran at
        settings["own_shots"] = own
    if ev.chat_template != "off" and not unit.raw:  # "auto" resolves per model, and the model is part of the key
        settings["chat_template"] = ev.chat_template
    return settings


def unit_key(qkey: str, settings: dict, versions: dict) -> str:
    return digest({"model": qkey, "eval": settings, "versions": versions})
