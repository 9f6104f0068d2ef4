"""A content-addressed store: every artifact lives under the hash of everything that produced it.

    ROOT/calib/<key>.pt + .json       calibration token ids and their manifest
    ROOT/quant/<key>.json             quantization record (recipe, manifest, seconds, layer errors)
    ROOT/models/<key>/                quantized model directory (only when a study keeps models)
    ROOT/results/<key>.json           one evaluation unit (ppl source or task@shots) with samples
    ROOT/windows/<key>.pt             perplexity windows of one text source
    ROOT/diag/<key>.pt                fp-model statistics of one text set (diagnostics)
    ROOT/quarantine/<kind>/<name>     entries found corrupt, moved aside (never deleted); log.txt says why
    ROOT/locks/<kind>-<key>.lock      who is computing what, when several processes share the cache

Every entry carries a checksum of its payload and of its own name (the `_checksum` field of the
JSON object or of the saved tensor dict), so an entry is done only when it reads back and verifies:
a truncated copy, a garbled disk block or a file under another entry's name is reported once,
moved to the quarantine and treated as missing, and the study recomputes it. Entries written
before checksums existed are accepted when they parse.

Writes go to a temp file in the same directory, fsynced, then renamed into place, so a kill at any
moment leaves either the old state or the complete new file under the final name, never a torn one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic

CHECKSUM = "_checksum"  # the field of a payload that holds its checksum
KINDS = {"calib": (".pt", ".json"), "quant": (".json",), "results": (".json",), "windows": (".pt",), "diag": (".pt",)}


class CorruptEntry(Exception):
    """An entry that is present but cannot be trusted; the message says why."""


@dataclass(frozen=True)
class Cache:
    root: Path
    written: list[str] = field(default_factory=list, compare=False)  # entries this object wrote
    quarantined: list[tuple[str, str]] = field(default_factory=list, compare=False)  # (entry, why) it moved aside
    warn: bool = field(default=True, compare=False)  # print a warning line for each (off when the caller reports)

    def path(self, kind: str, key: str, suffix: str = ".json") -> Path:
        return self.root / kind / f"{key}{suffix}"

    # ------------------------------------------------------------ reading (verified)

    def get_json(self, kind: str, key: str) -> dict | None:
        return self._read(kind, key, ".json")

    def get_tensors(self, kind: str, key: str) -> dict | None:
        return self._read(kind, key, ".pt")

    def has(self, kind: str, key: str, suffix: str = ".json") -> bool:
        """Readable and verified, not merely present: a corrupt entry is moved aside and is not done."""
        return self._read(kind, key, suffix) is not None

    def check(self, kind: str, key: str, suffix: str = ".json") -> tuple[str, str]:
        """('ok' | 'missing' | 'corrupt', why): a corrupt entry is moved aside, as any read of it would."""
        n = len(self.quarantined)
        if self._read(kind, key, suffix) is not None:
            return "ok", ""
        return ("corrupt", self.quarantined[-1][1]) if len(self.quarantined) > n else ("missing", "")

    def _read(self, kind: str, key: str, suffix: str, retry: bool = True) -> dict | None:
        p = self.path(kind, key, suffix)
        try:
            with open(p, "rb") as f:
                seen = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as err:  # something else under the entry's name
            return self._corrupt(p, None, f"not a file: {err.strerror}", kind, key, suffix, retry)
        except OSError as err:
            if err.errno != errno.EIO:  # e.g. permissions: not the entry's fault, and moving it would fail too
                raise
            return self._corrupt(p, None, f"unreadable: {err.strerror}", kind, key, suffix, retry)
        try:
            return verified(raw, entry_name(kind, key, suffix))
        except CorruptEntry as err:
            return self._corrupt(p, seen, str(err), kind, key, suffix, retry)

    def _corrupt(
        self, p: Path, seen: os.stat_result | None, why: str, kind: str, key: str, suffix: str, retry: bool
    ) -> dict | None:
        if entry_name(kind, key, suffix) in dict(self.quarantined):  # found before and left in place
            return None
        if seen is not None and not _same_file(p, seen):
            # another process replaced it since we read it (with a fresh, complete entry): read that one
            return self._read(kind, key, suffix, retry=False) if retry else None
        self.quarantine(p, why)
        return None

    # ------------------------------------------------------------ writing (atomic, with checksum)

    def put_json(self, kind: str, key: str, data: dict) -> None:
        name = entry_name(kind, key, ".json")
        plain = json.loads(json.dumps(data, default=str))  # what a reader will get back, e.g. tuples as lists
        body = json.dumps({**plain, CHECKSUM: checksum(name, plain)}, indent=2, sort_keys=True)
        write_atomic(self.path(kind, key), lambda f: f.write(body.encode()))
        self.written.append(name)

    def put_tensors(self, kind: str, key: str, data: dict) -> None:
        name = entry_name(kind, key, ".pt")
        payload = {**data, CHECKSUM: checksum(name, data)}
        write_atomic(self.path(kind, key, ".pt"), lambda f: torch.save(payload, f))
        self.written.append(name)

    # ------------------------------------------------------------ quarantine and locks

    def quarantine(self, p: Path, why: str) -> Path | None:
        """Move a bad entry (file or directory) aside, log why, and warn once; None if it is gone
        already (another process moved it) or cannot be moved (a read-only cache: it is then only
        treated as missing)."""
        rel = p.relative_to(self.root)
        try:
            dest: Path | None = self._move_aside(p, rel, why)
        except FileNotFoundError:
            return None
        except OSError as err:
            dest, why = None, f"{why}; cannot move it aside: {err.strerror or err}"
        self.quarantined.append((str(rel), why))
        if self.warn:
            where = f"moved to {dest}" if dest else "left in place"
            print(
                f"warning: cache entry {rel} is corrupt ({why}); {where}, it will be recomputed",
                file=sys.stderr,
                flush=True,
            )
        return dest

    def _move_aside(self, p: Path, rel: Path, why: str) -> Path:
        dest = self.root / "quarantine" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while dest.exists():  # keep every bad copy: each may tell a different story
            dest = dest.with_name(f"{rel.name}.{n}")
            n += 1
        os.replace(p, dest)
        with open(self.root / "quarantine" / "log.txt", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\t{rel}\t{why}\n")
        return dest

    @contextmanager
    def claim(self, kind: str, key: str, wait: bool | float = True) -> Iterator[bool]:
        """Hold the lock of one entry (or work) while checking, computing and storing it, so two
        processes sharing the cache never compute it twice. Yields False, holding nothing, when
        another process holds it and `wait` is False (do not wait) or a number of seconds that
        passed without the lock coming free (True: wait as long as it takes)."""
        from filelock import FileLock, Timeout

        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{kind}-{key}.lock"))
        timeout = -1.0 if wait is True else (0.0 if wait is False else float(wait))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def model_dir(self, key: str) -> Path:
        return self.root / "models" / key

    def check_model_dir(self, key: str) -> tuple[str, str]:
        """A kept quantized model against the sha256 of each file its quantshift.json lists; a
        damaged one is moved aside like any entry (the work then quantizes again)."""
        from ..checkpoint import file_sha256, read_quant_info
        from ..errors import ModelError

        d = self.model_dir(key)
        if not d.is_dir():
            return "missing", ""
        try:
            for fname, want in read_quant_info(d).get("files", {}).items():
                if not (d / fname).is_file() or file_sha256(d / fname) != want:
                    raise ModelError(f"{fname} is missing or does not match its sha256")
        except ModelError as err:
            self.quarantine(d, str(err))
            return "corrupt", str(err)
        return "ok", ""


def entry_name(kind: str, key: str, suffix: str) -> str:
    return f"{kind}/{key}{suffix}"


def _same_file(p: Path, seen: os.stat_result) -> bool:
    try:
        now = p.stat()
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
        seen.st_dev,
        seen.st_ino,
        seen.st_size,
        seen.st_mtime_ns,
    )


# ---------------------------------------------------------------- checksums


def checksum(name: str, data: Any) -> str:
    """sha256 of the entry's name and payload: a payload copied under another key fails too."""
    h = hashlib.sha256(f"{name}\n".encode())
    if name.endswith(".json"):  # canonical JSON: the C encoder is fast on results with many samples
        h.update(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    else:
        _feed(h, data)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    """A canonical byte stream of a JSON-like tree with tensors (dict order does not matter)."""
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(json.dumps(str(k)).encode() + b":")
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
            h.update(b",")
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor({t.dtype},{tuple(t.shape)})".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:  # str, int, float (repr is exact), bool, None
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def verified(raw: bytes, name: str) -> dict:
    """The payload of a stored entry, without its checksum field; CorruptEntry if it does not parse,
    is not a dict, or does not match its checksum."""
    data = _parse(raw, name)
    if not isinstance(data, dict):
        raise CorruptEntry(f"holds a {type(data).__name__}, not an entry")
    want = data.pop(CHECKSUM, None)
    if want is None:
        return data  # written before checksums: it parsed, which is all that can be checked
    if checksum(name, data) != want:
        raise CorruptEntry("checksum mismatch: damaged, or not the entry its name says")
    return data


def _parse(raw: bytes, name: str) -> Any:
    if not raw:
        raise CorruptEntry("empty file")
    if name.endswith(".json"):
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptEntry(f"not valid JSON, truncated or garbled: {err}") from None
    try:
        return torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as err:  # torch raises many kinds on a torn or foreign file
        first = (str(err).splitlines() or [""])[0].split(". ")[0][:120]
        raise CorruptEntry(f"not a readable tensor file, truncated or garbled: {type(err).__name__}: {first}") from None


# ---------------------------------------------------------------- verifying a study's cache


def work_entries(work: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, key, suffix) of every entry a finished work leaves in the cache (windows excepted:
    their keys depend on the tokenizer, known only once a model is loaded)."""
    if work["kind"] == "diag":
        out = [("diag", s["key"], ".pt") for s in work["sets"]]
        out += [
            ("calib", s["calib_key"], suf) for s in work["sets"] if s["kind"] == "calib" for suf in (".pt", ".json")
        ]
        return out
    out = [("results", u["key"], ".json") for u in work["units"]]
    if work["recipe"] is not None:
        out.append(("quant", work["key"], ".json"))
    if work.get("calib_key"):
        out += [("calib", work["calib_key"], ".pt"), ("calib", work["calib_key"], ".json")]
    return out


@dataclass
class Verification:
    ok: int = 0
    missing: int = 0
    corrupt: list[str] = field(default_factory=list)  # "name: why", each moved to the quarantine
    others_ok: int = 0  # entries of the cache that this study does not reference
    others_corrupt: list[str] = field(default_factory=list)
    stale_temp: int = 0  # temp files of writes a kill interrupted, removed


def verify(cache: Cache, works: Sequence[Mapping[str, Any]], others: bool = True) -> Verification:
    """Read and verify every entry the works reference (and, with `others`, every other entry in the
    cache's entry folders); corrupt ones are moved to the quarantine, so the next run recomputes them."""
    out = Verification()
    seen: set[str] = set()
    for w in works:
        for kind, key, suffix in work_entries(w):
            name = entry_name(kind, key, suffix)
            if name in seen:
                continue
            seen.add(name)
            status, why = cache.check(kind, key, suffix)
            if status == "ok":
                out.ok += 1
            elif status == "missing":
                out.missing += 1
            else:
                out.corrupt.append(f"{name}: {why}")
    for key in sorted({w["key"] for w in works if w.get("recipe")}):  # kept models, where the study keeps them
        seen.add(f"models/{key}")
        status, why = cache.check_model_dir(key)
        if status == "ok":
            out.ok += 1
        elif status == "corrupt":
            out.corrupt.append(f"models/{key}: {why}")
    if others:
        models = cache.root / "models"
        for d in sorted(models.iterdir()) if models.is_dir() else []:
            if f"models/{d.name}" not in seen and not d.name.startswith("."):
                status, why = cache.check_model_dir(d.name)
                if status == "ok":
                    out.others_ok += 1
                elif status == "corrupt":
                    out.others_corrupt.append(f"models/{d.name}: {why}")
        out.stale_temp = remove_stale_temp(cache)
        for kind, key, suffix in _all_entries(cache):
            if entry_name(kind, key, suffix) in seen:
                continue
            status, why = cache.check(kind, key, suffix)
            if status == "ok":
                out.others_ok += 1
            elif status == "corrupt":
                out.others_corrupt.append(f"{entry_name(kind, key, suffix)}: {why}")
    return out


def _all_entries(cache: Cache) -> list[tuple[str, str, str]]:
    out = []
    for kind, suffixes in KINDS.items():
        d = cache.root / kind
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if not p.name.startswith(".") and p.suffix in suffixes:  # dot-files: temp files of writes
                out.append((kind, p.name[: -len(p.suffix)], p.suffix))
    return out


def remove_stale_temp(cache: Cache, older_than_s: float = 3600.0) -> int:
    """Delete the temp files of writes that a kill interrupted (never read, only taking space); an
    hour old at least, so a write still in progress in another process is left alone."""
    n = 0
    for kind in (*KINDS, "models"):
        d = cache.root / kind
        for p in d.glob(".*.tmp") if d.is_dir() else []:
            try:
                if p.is_file() and time.time() - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
    return n
