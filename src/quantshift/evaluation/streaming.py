"""Perplexity of a model whose weights stay on disk, block by block over all windows.

The way calibration runs (quant.engine): the embeddings turn every window into block-0 inputs
(the engine's capture records each block's keyword arguments too), then each block is read from
disk once, runs over every batch of windows, and is released; the final norm likewise; then the
head is read a vocabulary slice at a time (evaluation.scoring). Each block's weights are read
once per pass instead of once per batch of windows, and a pass holds one block, the windows'
hidden states and one slice of the head.

With the same batches, kernels and tiles as the in-memory path (a whole-model forward per batch,
then evaluation.scoring batch by batch), the window NLLs are the same bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..models.lazy import SourceBlocks, materialize, release
from ..models.shards import return_freed_memory
from .scoring import CHUNKED_MODEL_TYPES, Head, batches_nlls, softcap_of

if TYPE_CHECKING:
    from ..models.load import LoadedModel


def streamed_window_nlls(
    loaded: LoadedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
    max_windows_per_pass: int | None = None,
) -> torch.Tensor:
    """Each window's NLL summed over its predicted tokens (float64 [windows]) for a LoadedModel
    whose weights are on disk (`loaded.source`); `max_windows_per_pass` bounds the hidden states
    held at once (more windows: several passes over the weights)."""
    from ..errors import ModelError

    config = loaded.model.config
    if getattr(config, "model_type", None) not in CHUNKED_MODEL_TYPES:
        raise ModelError(
            f"streamed evaluation supports model types {', '.join(CHUNKED_MODEL_TYPES)}; "
            f"{getattr(config, 'model_type', '?')} must fit in memory (raise --max-memory)"
        )
    per_pass = max_windows_per_pass or windows.shape[0]
    per_pass = max(batch_size, per_pass - per_pass % batch_size)  # whole batches: the same shapes as in memory
    out = []
    with tqdm(total=windows.numel(), desc=desc, disable=not progress, unit="tok", unit_scale=True, leave=False) as bar:
        for s in range(0, windows.shape[0], per_pass):
            part = windows[s : s + per_pass]
            out.append(_one_pass(loaded, part, batch_size))
            bar.update(part.numel())
    return torch.cat(out)


def _one_pass(loaded: LoadedModel, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    from ..quant.engine import BlockEngine, _block_output

    model, arch, device, source = loaded.model, loaded.arch, loaded.device, loaded.source
    assert source is not None  # streamed: the weights are on disk
    residency = SourceBlocks(source, arch.blocks_path, arch.backbone_path)
    engine = BlockEngine(
        model,
        arch,
        [],
        device,
        batch_size=batch_size,
        progress=False,
        autocast=loaded.precision.autocast,
        residency=residency,
    )
    with torch.no_grad():
        engine.capture(windows)
        hidden = engine.inputs
        blocks = arch.blocks(model)
        for i, block in enumerate(blocks):
            residency.load(i, block, device)
            nxt = []
            for b, h in enumerate(hidden):
                with loaded.compute(device):
                    nxt.append(_block_output(block(h.to(device), **engine.kwargs_for(i, b))))
            hidden = nxt
            residency.done(i, block, engine)
        norm = arch.final_norm(model)
        norm_name = next(n for n, m in model.named_modules() if m is norm)
        materialize(norm, f"{norm_name}.", source, device)
        with loaded.compute(device):
            hidden = [norm(h) for h in hidden]
        release(norm)
        return_freed_memory()
        ids = [windows[b : b + batch_size] for b in range(0, windows.shape[0], batch_size)]
        nlls = batches_nlls(hidden, ids, streamed_head(loaded), lambda: loaded.compute(device))
    return torch.cat(nlls)


def streamed_head(loaded: LoadedModel) -> Head:
    """The output projection read from disk a vocabulary slice at a time, in the model's dtype."""
    model, source = loaded.model, loaded.source
    assert source is not None  # streamed: the weights are on disk
    get_out: Any = getattr(model, "get_output_embeddings")  # noqa: B009 (typed as a Tensor by nn.Module)
    head = get_out()
    name = next(n for n, m in model.named_modules() if m is head)
    dtype, device = head.weight.dtype, loaded.device
    bias = None
    if getattr(head, "bias", None) is not None:
        bias = source.read([f"{name}.bias"])[f"{name}.bias"].to(device, dtype)
    return Head(
        lambda a, b: source.read_rows(f"{name}.weight", a, b).to(device, dtype),
        head.weight.shape[0],
        bias,
        softcap_of(model.config),
    )
