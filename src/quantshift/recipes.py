"""Recipes: ordered lists of method stages, from YAML or CLI shortcuts.

YAML form (each stage is a one-key mapping: method name -> options):

    stages:
      - smoothquant: {alpha: 0.8}
      - gptq: {wbits: 4, group_size: 128, abits: 8}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import KEEP_BITS, granularity, grouped, load_yaml, parse
from .errors import ConfigError
from .methods import METHODS, Method, StageConfig


@dataclass(frozen=True)
class Stage:
    method: str
    config: StageConfig

    def build(self) -> Method:
        return METHODS.get(self.method)(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {self.method: self.config.model_dump(mode="json")}


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def needs_calibration(self) -> bool:
        return any(METHODS.get(s.method).needs_calibration for s in self.stages)

    def stack_problem(self) -> str | None:
        """Why this order of stages cannot work (None when it can): a stage that rounds weights
        again after a method whose weights are final (Method.final_weights)."""
        for i, stage in enumerate(self.stages):
            reason = METHODS.get(stage.method).final_weights
            if reason is None:
                continue
            for later in self.stages[i + 1 :]:
                if (
                    METHODS.get(later.method).kind == "quantize"
                    and getattr(later.config, "wbits", KEEP_BITS) != KEEP_BITS
                ):
                    return (
                        f"stage {later.method!r} after {stage.method!r} would re-quantize its weights: {reason}; "
                        "put only transform or activation-only (wbits: 16) stages after it"
                    )
        return None

    def describe(self) -> str:
        parts = []
        for s in self.stages:
            c = s.config
            fmt = (
                f"w{c.wbits}"
                + (f"a{c.abits}" if c.abits != KEEP_BITS else "")
                + (granularity(c.group_size) if grouped(c.group_size) else "")
            )
            parts.append(f"{s.method}({fmt})")
        return " -> ".join(parts)


def make_stage(method: str, options: dict[str, Any] | None, where: str = "") -> Stage:
    cls = METHODS.get(method)
    return Stage(method, parse(cls.Config, options or {}, where or f"stage {method!r}"))


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if isinstance(data, dict):
        unknown = set(data) - {"stages"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: stages)")
        data = data.get("stages")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: a recipe is a non-empty list of stages like '- gptq: {{wbits: 4}}'")
    stages = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{where}: stage {i} must be a one-key mapping 'method: {{options}}'")
        ((method, options),) = item.items()
        stages.append(make_stage(method, options, f"{where} stage {i} ({method})"))
    return Recipe(tuple(stages))


def load_recipe(path: str | Path) -> Recipe:
    return recipe_from_dict(load_yaml(path), str(path))


def recipe_from_cli(method: str, **options: Any) -> Recipe:
    """`--method a+b` is not accepted: stacks are written as YAML recipes or `a,b` lists."""
    names = [m.strip() for m in method.split(",") if m.strip()]
    opts = {k: v for k, v in options.items() if v is not None}
    stages = []
    for name in names:
        cls = METHODS.get(name)
        allowed = {k: v for k, v in opts.items() if k in cls.Config.model_fields}
        stages.append(make_stage(name, allowed))
    return Recipe(tuple(stages))
