"""A content-addressed store: every artifact lives under the hash of everything that produced it.

    ROOT/calib/<key>.pt + .json       calibration token ids and their manifest
    ROOT/quant/<key>.json             quantization record (recipe, manifest, seconds, layer errors)
    ROOT/models/<key>/                quantized model directory (only when a study keeps models)
    ROOT/results/<key>.json           one evaluation unit (ppl source or task@shots) with samples
    ROOT/diag/<key>.pt                fp-model statistics of one text set (diagnostics)

Writes go to a temp file renamed into place, so a kill at any moment leaves either the old state
or the complete new file, never a torn one; the presence of a file means the work is done.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_json_atomic


@dataclass(frozen=True)
class Cache:
    root: Path

    def path(self, kind: str, key: str, suffix: str = ".json") -> Path:
        return self.root / kind / f"{key}{suffix}"

    def get_json(self, kind: str, key: str) -> dict | None:
        p = self.path(kind, key)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # unreadable = not done; it will be recomputed and replaced

    def put_json(self, kind: str, key: str, data: Any) -> None:
        write_json_atomic(self.path(kind, key), data)

    def has(self, kind: str, key: str, suffix: str = ".json") -> bool:
        return self.path(kind, key, suffix).is_file()

    def get_tensors(self, kind: str, key: str) -> dict | None:
        p = self.path(kind, key, ".pt")
        if not p.is_file():
            return None
        try:
            return torch.load(p, weights_only=True)
        except Exception:  # a torn file cannot happen with atomic writes, but a foreign one might
            return None

    def put_tensors(self, kind: str, key: str, data: dict) -> None:
        p = self.path(kind, key, ".pt")
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def model_dir(self, key: str) -> Path:
        return self.root / "models" / key
