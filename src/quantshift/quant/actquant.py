"""Run-time fake quantization of linear inputs (the "A" in W8A8), attached as forward pre-hooks.

Hooks keep the module tree and the state dict identical to the plain model, so a quantized
checkpoint stays an ordinary Hugging Face checkpoint; quantshift.json records which linears
quantize their inputs and `attach_input_quantizers` restores the hooks on load.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .primitives import QuantSpec, fake_quantize_activation


class InputQuantizer:
    """Callable pre-hook: dynamic per-token (or per-tensor) fake quantization of the input."""

    def __init__(self, spec: QuantSpec, per_token: bool = True, static_scale: float | None = None) -> None:
        self.spec = spec
        self.per_token = per_token
        self.static_scale = static_scale

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (fake_quantize_activation(x, self.spec, per_token=self.per_token), *args[1:])

    def to_dict(self) -> dict:
        return {"spec": self.spec.model_dump(), "per_token": self.per_token}


def attach_input_quantizer(linear: nn.Module, spec: QuantSpec, per_token: bool = True) -> RemovableHandle:
    return linear.register_forward_pre_hook(InputQuantizer(spec, per_token))


def attach_input_quantizers(model: nn.Module, table: dict[str, dict]) -> list[RemovableHandle]:
    """table: module name -> {"spec": {...}, "per_token": bool} as written in quantshift.json."""
    modules = dict(model.named_modules())
    handles = []
    for name, entry in table.items():
        if name not in modules:
            raise KeyError(f"quantized checkpoint names module {name!r} that the model does not have")
        handles.append(attach_input_quantizer(modules[name], QuantSpec(**entry["spec"]), entry.get("per_token", True)))
    return handles
