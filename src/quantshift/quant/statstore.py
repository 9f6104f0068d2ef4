"""A disk cache of per-block input statistics (GPTQ-family Hessians) computed on fp inputs.

With `propagate="fp"` every block is calibrated on the unquantized model's activations, so the
Hessian H = 2/N sum x x^T of each linear depends only on (model, calibration set, block), not on
the bit width or the method options. It is then worth keeping: a second bit width, group size or
damping needs no calibration forward pass at all, and a union of calibration sets ("a+b", e.g.
a 50/50 mixture of two sources) is the token-weighted mean of its parts' Hessians, exactly.

Layout: <root>/<model key>/<calibration sha256>/block-<i>.safetensors, one tensor per distinct
statistics object (q/k/v share one) and the name -> tensor map plus token counts in its metadata.
Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class CalibIdentity:
    """What a calibration set's statistics are keyed by: its ids' sha256, and its parts' (if a union)."""

    sha256: str
    parts: tuple[str, ...] = ()

    @classmethod
    def of(cls, manifest: Any) -> CalibIdentity:
        return cls(manifest.sha256, tuple(p["sha256"] for p in getattr(manifest, "parts", ()) or ()))


class StatsStore:
    def __init__(self, root: str | Path, model_key: str) -> None:
        self.root = Path(root) / model_key

    def _path(self, calib_sha: str, block: int) -> Path:
        return self.root / calib_sha / f"block-{block}.safetensors"

    def has_block(self, calib: CalibIdentity, block: int) -> bool:
        if self._path(calib.sha256, block).is_file():
            return True
        return bool(calib.parts) and all(self._path(p, block).is_file() for p in calib.parts)

    def complete(self, calib: CalibIdentity, n_blocks: int) -> bool:
        return all(self.has_block(calib, b) for b in range(n_blocks))

    def load_block(self, calib: CalibIdentity, block: int) -> dict[str, tuple[torch.Tensor, int]] | None:
        """name -> (H, tokens); linears that shared one statistics object share the tensor again."""
        own = self._read(self._path(calib.sha256, block))
        if own is not None or not calib.parts:
            return own
        parts = [self._read(self._path(p, block)) for p in calib.parts]
        if any(p is None for p in parts):
            return None
        return _token_weighted_mean(parts)  # type: ignore[arg-type]

    def save_block(self, calib: CalibIdentity, block: int, stats: dict[str, tuple[torch.Tensor, int]]) -> None:
        path = self._path(calib.sha256, block)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        names: dict[str, list] = {}
        ids: dict[int, str] = {}
        for name, (H, tokens) in stats.items():
            key = ids.setdefault(id(H), f"s{len(ids)}")
            tensors.setdefault(key, H.detach().float().cpu().contiguous())
            names[name] = [key, int(tokens)]
        from safetensors.torch import save_file

        from ..atomic import commit_file

        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"names": json.dumps(names)})
        commit_file(tmp, path)

    @staticmethod
    def _read(path: Path) -> dict[str, tuple[torch.Tensor, int]] | None:
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            names = json.loads(f.metadata()["names"])
            tensors = {k: f.get_tensor(k) for k in {v[0] for v in names.values()}}
        return {name: (tensors[key], tokens) for name, (key, tokens) in names.items()}


def _token_weighted_mean(parts: list[dict[str, tuple[torch.Tensor, int]]]) -> dict[str, tuple[torch.Tensor, int]]:
    """H of the union = sum_i tokens_i H_i / sum_i tokens_i (each H_i is a mean over its tokens)."""
    out: dict[str, tuple[torch.Tensor, int]] = {}
    done: dict[int, tuple[torch.Tensor, int]] = {}
    for name, (H0, _t) in parts[0].items():
        if id(H0) not in done:  # keep the sharing of q/k/v
            total = sum(p[name][1] for p in parts)
            H = sum(p[name][0].double() * (p[name][1] / total) for p in parts)
            done[id(H0)] = (H.float(), total)  # type: ignore[union-attr]
        out[name] = done[id(H0)]
    return out
