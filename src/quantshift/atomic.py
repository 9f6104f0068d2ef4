"""Atomic file writes, the one implementation every writer uses.

A file is written to a temp file beside its final name, fsynced, renamed over the final name, and
the directory is fsynced, so a kill or power cut at any point leaves either the old content or the
new, never a torn file; the temp file is a dot-file that no reader looks at.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """write(f) into a temp file beside `path`, then commit it there (see the module doc). On any
    error the final name keeps its previous content and the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def commit_file(tmp: Path, path: Path) -> None:
    """Make a file a library wrote by name (safetensors' save_file) durable, then rename it over
    `path` and fsync the directory."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_dir(d: Path) -> None:
    """Make a rename durable (a power cut after it must not bring back the old state)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)
