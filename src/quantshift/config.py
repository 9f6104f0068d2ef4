"""Strict typed configs: unknown keys are errors that name the key and the allowed ones."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys rejected, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def describe_validation_error(model: type[BaseModel], err: ValidationError, where: str = "") -> str:
    """Turn pydantic's multi-line error into one line naming the key and what is allowed."""
    parts = []
    for e in err.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            parts.append(f"unknown key {loc!r} (allowed: {', '.join(allowed)})")
        else:
            # a rule's own ValueError reads as written ("wbits must be 2..8 ..."), without pydantic's prefix
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc or 'value'}: {msg}")
    prefix = f"{where}: " if where else ""
    return prefix + "; ".join(parts)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or not isinstance(part, str) or part not in fields:
            return sorted(getattr(model, "model_fields", {}))
        ann = fields[part].annotation
        current = _first_model(ann) or current
    return sorted(getattr(current, "model_fields", {}))


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def parse(model: type[M], data: Any, where: str = "") -> M:
    """Validate `data` into `model`, raising ConfigError with a one-line message."""
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(model, err, where)) from None


def user_path(text: str | Path) -> Path:
    """A path as a user typed it, ~ expanded; "~name" of no known user stays as written (a plain
    relative name that then does not exist) instead of raising from deep inside a check."""
    p = Path(str(text))
    try:
        return p.expanduser()
    except RuntimeError:
        return p


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------- number-format sentinels
# The special values stage configs and QuantSpec accept, named once for the code that tests or
# prints them (the accepted YAML values stay the plain numbers).

KEEP_BITS = 16  # wbits / abits 16: that tensor is not quantized, it stays in floating point
PER_CHANNEL = -1  # group_size -1: one scale (and zero point) per output row
PER_TENSOR = 0  # group_size 0: one scale for the whole tensor


MAX_GROUP = 1 << 20  # the widest group a config accepts


# The number-format rules, stated once: the stage configs and their per-layer overrides use them as
# validators (methods/base.py), and the command line's --wbits/--abits/--group-size checks
# (validate.py) call them with the option's name. Each returns the value or raises ValueError.


def wbits_rule(v: int, name: str = "wbits") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not (2 <= v <= 8 or v == KEEP_BITS):
        raise ValueError(f"{name} must be 2..8 (or {KEEP_BITS} = keep weights), got {v!r}")
    return v


def abits_rule(v: int, name: str = "abits") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not (4 <= v <= 8 or v == KEEP_BITS):
        raise ValueError(f"{name} must be 4..8 (or {KEEP_BITS} = no activation quantization), got {v!r}")
    return v


def group_size_rule(v: int, name: str = "group_size") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not (v in (PER_CHANNEL, PER_TENSOR) or 1 <= v <= MAX_GROUP):
        raise ValueError(
            f"{name} must be -1 (per channel), 0 (per tensor) or a group width 1..{MAX_GROUP} "
            f"(e.g. 32, 64, 128), got {v!r}"
        )
    return v


MAX_SEED = (1 << 63) - 1  # torch.Generator.manual_seed's range (non-negative part)


def seed_rule(v: int, name: str = "seed") -> int:
    return int(integer_rule(v, name, 0, MAX_SEED))


# Sanity caps on sizes, far above any real use: a value beyond them is a typo (an extra zero
# or two), and failing now beats failing after the model loaded, or never finishing.
MAX_SEQLEN = 1 << 20  # tokens per window
MAX_COUNT = 1 << 20  # calibration windows, perplexity windows, items, repeats
MAX_BATCH = 1 << 16
MAX_SHOTS = 1000


def number_rule(v: Any, name: str, lo: float, hi: float, lo_open: bool = False, note: str = "") -> Any:
    """A finite number in [lo, hi] ((lo, hi] when lo_open); `note` says what it means."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (ok and (lo < v if lo_open else lo <= v) and v <= hi):
        bound = ">" if lo_open else ">="
        raise ValueError(f"{name} must be a number {bound} {lo:g} and <= {hi:g}{note}, got {v!r}")
    return v


def integer_rule(v: Any, name: str, lo: int, hi: int, note: str = "") -> Any:
    """An integer in lo..hi; `note` names special values, e.g. " (0 = all)"."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer {lo}..{hi}{note}, got {v!r}")
    return v


def non_empty(v: list[Any], info: ValidationInfo) -> list[Any]:
    """A field validator: a list that must name at least one thing."""
    if not v:
        raise ValueError(f"{info.field_name} is empty; give at least one")
    return v


def number_in(lo: float, hi: float, lo_open: bool = False, note: str = "") -> Callable[[Any, ValidationInfo], Any]:
    """number_rule as a field validator (None passes: an optional option left unset)."""

    def check(v: Any, info: ValidationInfo) -> Any:
        return v if v is None else number_rule(v, str(info.field_name), lo, hi, lo_open, note)

    return check


def integer_in(lo: int, hi: int, note: str = "") -> Callable[[Any, ValidationInfo], Any]:
    """integer_rule as a field validator, for a value or each item of a list (None passes)."""

    def check(v: Any, info: ValidationInfo) -> Any:
        for item in v if isinstance(v, list) else [] if v is None else [v]:
            integer_rule(item, str(info.field_name), lo, hi, note)
        return v

    return check


def grouped(group_size: int) -> bool:
    """True for groups of `group_size` consecutive input columns (not per-channel / per-tensor)."""
    return group_size > 0


def granularity(group_size: int) -> str:
    """A group size as labels print it: "per-channel" (-1), "per-tensor" (0), "g128" (groups)."""
    if group_size == PER_CHANNEL:
        return "per-channel"
    if group_size == PER_TENSOR:
        return "per-tensor"
    return f"g{group_size}"
