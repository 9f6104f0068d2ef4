"""The quantization pipeline: model + recipe + calibration set -> quantized model + report, in
memory (quantize_model, then save) or block-streamed into a sharded directory (quantize_streaming)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import DEFAULT_SHARD_BYTES, QuantizedDirWriter, save_quantized, staged_directory
from .data.calibset import CalibSet
from .errors import ConfigError
from .models.arch import ArchSpec
from .models.lazy import SourceBlocks, WeightSource, release
from .models.load import LoadedModel
from .models.shards import return_freed_memory
from .quant.engine import BlockEngine, EngineResult
from .quant.pinned import pinned_pool
from .quant.statstore import CalibIdentity, StatsStore
from .recipes import Recipe


@dataclass
class PipelineRun:
    """What the engine did to a model under one recipe (api.QuantizationResult wraps it for users)."""

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
    return {
        "avg_bits": bits / params,
        "bits": bits,
        "params": params,
        "modules": len(infos),
        "outliers": sum(i.get("outliers", 0) for i in infos),
    }


def numerics_summary(modules: dict) -> dict | None:
    """What factoring the Hessians took (GPTQ family, info "damp"/"damp_steps"/"fallback"):
    linears whose damping had to be raised (name -> damping used) and those rounded to nearest
    because no damping helped. None when no stage factored a Hessian."""
    infos = {name: m.info for name, m in modules.items() if "damp" in m.info}
    if not infos:
        return None
    return {
        "linears": len(infos),
        "damp_raised": {n: i["damp"] for n, i in infos.items() if i.get("damp_steps") and not i.get("fallback")},
        "fallback_rtn": [n for n, i in infos.items() if i.get("fallback") == "rtn"],
    }


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


def quantize_model(
    loaded: LoadedModel,
    recipe: Recipe,
    calib: CalibSet | None,
    device: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    propagate: str = "quantized",
    stats_store: StatsStore | None = None,
    activations: str = "auto",
    residency: Any = None,
) -> PipelineRun:
    """Quantize `loaded.model` in place, block by block.

    propagate "fp" calibrates every block on the unquantized model's activations; only then can
    `stats_store` keep GPTQ-family Hessians per calibration set for later runs. `activations`:
    where calibration activations live on a GPU (quant.engine.activation_home); `residency`:
    where blocks live between uses (default in memory; StreamedBlocks: on disk)."""
    if recipe.needs_calibration and calib is None:
        raise ConfigError(f"recipe {recipe.describe()} needs calibration data (--calib)")
    if (problem := recipe.stack_problem()) is not None:
        raise ConfigError(f"recipe: {problem}")
    if stats_store is not None and propagate != "fp":
        raise ConfigError(
            "a statistics cache needs fp propagation: with quantized propagation each block's "
            "inputs depend on the bit width and method, so its statistics cannot be reused"
        )
    model = loaded.model
    dev = device or ("cpu" if loaded.source is not None else str(next(model.parameters()).device))
    stages = [s.build() for s in recipe.stages]
    calib_id = CalibIdentity.of(calib.manifest) if calib is not None else None
    engine = BlockEngine(
        model,
        loaded.arch,
        stages,
        dev,
        batch_size=batch_size,
        progress=progress,
        propagate=propagate,
        stats_store=stats_store,
        calib=calib_id,
        activations=activations,
        autocast=loaded.precision.autocast,
        residency=residency,
    )
    with torch.no_grad(), pinned_pool():  # offloaded activations reuse their pinned buffers
        result = engine.run(calib.input_ids if (calib is not None and recipe.needs_calibration) else None)
    line = numerics_line(numerics_summary(result.modules))
    if line is not None:  # stderr, next to the progress bars; the report keeps the details
        tqdm.write(line, file=sys.stderr)
    return PipelineRun(
        result,
        recipe,
        calib.manifest.to_dict() if calib is not None and recipe.needs_calibration else None,
        propagate,
        loaded.precision.name,
    )


def save(
    loaded: LoadedModel,
    qres: PipelineRun,
    out: Path,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a model quantized in memory as a quantized directory (checkpoint.save_quantized)."""
    if loaded.source is not None:
        raise ConfigError("this model was quantized streaming: its directory was written as it was quantized")
    return save_quantized(
        loaded.model,
        loaded.tokenizer,
        out,
        base_model=loaded.name,
        recipe=qres.recipe.to_dict(),
        calibration=qres.calibration,
        modules=qres.engine.modules,
        report=qres.report(),
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        stored_dtype=loaded.stored_dtype,
    )


class StreamedBlocks(SourceBlocks):
    """The engine's residency when the model does not fit in memory: block i's weights are read
    from the checkpoint (`source`) when the engine reaches it, in the model's dtype on the
    compute device (a float32 master copy of this block only); when the engine is done with it,
    its tensors (codes and qparams for the quantized linears) go to `writer` and its weights back
    to the meta device, and the codes held in the engine's records are dropped."""

    def __init__(self, source: WeightSource, writer: QuantizedDirWriter, arch: ArchSpec) -> None:
        super().__init__(source, arch.blocks_path, arch.backbone_path)
        self.writer = writer

    def done(self, index: int, block: nn.Module, engine: BlockEngine) -> None:
        prefix = self.prefix(index)
        records = {n: m for n, m in engine.modules.items() if n.startswith(prefix)}
        self.writer.add_module(block, prefix, records)
        for m in records.values():
            m.release_codes()
        release(block)
        return_freed_memory()


def quantize_streaming(
    loaded: LoadedModel,
    recipe: Recipe,
    calib: CalibSet | None,
    out: Path,
    *,
    device: str,
    batch_size: int = 8,
    progress: bool = True,
    propagate: str = "quantized",
    stats_store: StatsStore | None = None,
    activations: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> PipelineRun:
    """Quantize a model whose weights stay on disk (`loaded.source`; `loaded.model` is a skeleton
    on meta) block by block with one block in memory, writing the quantized directory `out`
    shard by shard as blocks finish (atomically: a temp dir renamed into place at the end).
    The same engine and solvers as quantize_model, on the same float32 values: the codes equal
    the in-memory path's bit for bit."""
    if loaded.source is None:
        raise ConfigError("quantize_streaming needs a model loaded with its weights on disk (stream=True)")
    if recipe.needs_calibration and calib is None:
        raise ConfigError(f"recipe {recipe.describe()} needs calibration data (--calib)")
    source = loaded.source
    with staged_directory(Path(out), overwrite) as tmp:
        writer = QuantizedDirWriter(tmp, max_shard_bytes, source.stored_dtype)
        residency = StreamedBlocks(source, writer, loaded.arch)
        qres = quantize_model(
            loaded,
            recipe,
            calib,
            device=device,
            batch_size=batch_size,
            progress=progress,
            propagate=propagate,
            stats_store=stats_store,
            activations=activations,
            residency=residency,
        )
        blocks_prefix = f"{loaded.arch.blocks_path}."
        aliased = set(getattr(source, "aliases", {}))
        for name in loaded.model.state_dict(keep_vars=True):  # embeddings, final norm, head: as stored
            if not name.startswith(blocks_prefix) and name not in aliased:
                writer.add_float(name, source.read([name])[name])
        writer.finish(
            config=loaded.model.config,
            tokenizer=loaded.tokenizer,
            base_model=loaded.name,
            recipe=recipe.to_dict(),
            calibration=qres.calibration,
            report=qres.report(),
            dtype=str(loaded.precision.weights).replace("torch.", ""),
        )
    return qres
