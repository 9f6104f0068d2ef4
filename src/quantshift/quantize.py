"""The quantization entry point: model + recipe + calibration set -> quantized model + report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import save_quantized
from .data.calibset import CalibSet
from .errors import ConfigError
from .models.load import LoadedModel
from .quant.engine import BlockEngine, EngineResult
from .quant.pinned import pinned_pool
from .quant.statstore import CalibIdentity, StatsStore
from .recipes import Recipe


@dataclass
class QuantizationResult:
    engine: EngineResult
    recipe: Recipe
    calibration: dict | None
    propagate: str = "quantized"
    precision: str = "float32"  # models.precision.Precision.name the calibration forwards ran in

    def report(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "calibration": self.calibration,
            "seconds": round(self.engine.seconds, 3),
            "propagate": self.propagate,
            "precision": self.precision,
            "blocks": self.engine.blocks,
            "modules": {k: {"stage": m.stage, **m.info} for k, m in self.engine.modules.items()},
            "transforms": self.engine.transforms,
            "bits_per_param": measured_bits(self.engine.modules),
            "numerics": numerics_summary(self.engine.modules),
        }


def measured_bits(modules: dict) -> dict | None:
    """Overall bits per parameter over the modules whose method measured its storage
    (info "bits" and "params", e.g. SpQR); None when no method did."""
    infos = [m.info for m in modules.values() if "bits" in m.info and "params" in m.info]
    if not infos:
        return None
    bits, params = sum(i["bits"] for i in infos), sum(i["params"] for i in infos)
    return {"avg_bits": bits / params, "bits": bits, "params": params, "modules": len(infos),
            "outliers": sum(i.get("outliers", 0) for i in infos)}


def numerics_summary(modules: dict) -> dict | None:
    """What factoring the Hessians took (GPTQ family, info "damp"/"damp_steps"/"fallback"):
    linears whose damping had to be raised (name -> damping used) and those rounded to nearest
    because no damping helped. None when no stage factored a Hessian."""
    infos = {name: m.info for name, m in modules.items() if "damp" in m.info}
    if not infos:
        return None
    return {"linears": len(infos),
            "damp_raised": {n: i["damp"] for n, i in infos.items() if i.get("damp_steps") and not i.get("fallback")},
            "fallback_rtn": [n for n, i in infos.items() if i.get("fallback") == "rtn"]}


def numerics_line(summary: dict | None, show: int = 5) -> str | None:
    """One line for the user when some Hessian needed more damping or fell back; else None."""
    if not summary or not (summary["damp_raised"] or summary["fallback_rtn"]):
        return None
    raised, rtn = summary["damp_raised"], summary["fallback_rtn"]
    line = f"{len(raised)} of {summary['linears']} linears needed more damping"
    if raised:
        line += f" (up to {max(raised.values()):g} of the mean Hessian diagonal)"
    line += f"; {len(rtn)} fell back to RTN"
    if rtn:
        line += ": " + ", ".join(rtn[:show]) + (f" and {len(rtn) - show} more" if len(rtn) > show else "")
    return line


def quantize_model(loaded: LoadedModel, recipe: Recipe, calib: CalibSet | None, device: str | None = None,
                   batch_size: int = 8, progress: bool = True, propagate: str = "quantized",
                   stats_store: StatsStore | None = None, activations: str = "auto") -> QuantizationResult:
    """Quantize `loaded.model` in place, block by block.

    propagate "fp" calibrates every block on the unquantized model's activations; only then can
    `stats_store` keep GPTQ-family Hessians per calibration set for later runs. `activations`:
    where calibration activations live on a GPU (quant.engine.activation_home)."""
    if recipe.needs_calibration and calib is None:
        raise ConfigError(f"recipe {recipe.describe()} needs calibration data (--calib)")
    if stats_store is not None and propagate != "fp":
        raise ConfigError("a statistics cache needs fp propagation: with quantized propagation each block's "
                          "inputs depend on the bit width and method, so its statistics cannot be reused")
    model = loaded.model
    dev = device or str(next(model.parameters()).device)
    stages = [s.build() for s in recipe.stages]
    calib_id = CalibIdentity.of(calib.manifest) if calib is not None else None
    engine = BlockEngine(model, loaded.arch, stages, dev, batch_size=batch_size, progress=progress,
                         propagate=propagate, stats_store=stats_store, calib=calib_id, activations=activations,
                         autocast=loaded.precision.autocast)
    with torch.no_grad(), pinned_pool():  # offloaded activations reuse their pinned buffers
        result = engine.run(calib.input_ids if (calib is not None and recipe.needs_calibration) else None)
    line = numerics_line(numerics_summary(result.modules))
    if line is not None:  # stderr, next to the progress bars; the report keeps the details
        tqdm.write(line, file=sys.stderr)
    return QuantizationResult(result, recipe, calib.manifest.to_dict() if calib is not None and recipe.needs_calibration else None,
                              propagate, loaded.precision.name)


def save(loaded: LoadedModel, qres: QuantizationResult, out: Path, overwrite: bool = False) -> Path:
    return save_quantized(
        loaded.model, loaded.tokenizer, out, base_model=loaded.name, recipe=qres.recipe.to_dict(),
        calibration=qres.calibration, modules=qres.engine.modules, report=qres.report(), overwrite=overwrite,
    )
