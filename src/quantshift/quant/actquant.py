"""Run-time fake quantization of linear inputs (the "A" in W8A8), attached as forward pre-hooks.

Hooks keep the module tree and the state dict identical to the plain model, so a quantized
checkpoint stays an ordinary Hugging Face checkpoint; quantshift.json records which linears
quantize their inputs and `attach_input_quantizers` restores the hooks on load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .primitives import QuantSpec, fake_quantize, fake_quantize_activation, fp8_fake_quantize


def fake_quantize_static(x: torch.Tensor, spec: QuantSpec, scale: float) -> torch.Tensor:
    """Fake-quantize with a fixed (calibrated) per-tensor scale on a symmetric grid."""
    xf = x.float()
    if spec.dtype == "fp8":
        return fp8_fake_quantize(xf, torch.tensor(scale)).to(x.dtype)
    zero = torch.tensor(float(2 ** (spec.bits - 1)))
    return fake_quantize(xf, torch.tensor(scale), zero, spec.maxq).to(x.dtype)


class InputQuantizer:
    """Callable pre-hook: dynamic per-token (or per-tensor) fake quantization of the input."""

    def __init__(self, spec: QuantSpec, per_token: bool = True, static_scale: float | None = None) -> None:
        self.spec = spec
        self.per_token = per_token
        self.static_scale = static_scale

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.static_scale is not None:
            return (fake_quantize_static(x, self.spec, self.static_scale), *args[1:])
        return (fake_quantize_activation(x, self.spec, per_token=self.per_token), *args[1:])

    def to_dict(self) -> dict:
        d = {"spec": self.spec.model_dump(), "per_token": self.per_token}
        if self.static_scale is not None:
            d["static_scale"] = self.static_scale
        return d


class OutputQuantizer:
    """Callable forward hook: dynamic fake quantization of a module's output (e.g. the K/V cache),
    one range per token, or per token and head when `head_dim` is set."""

    def __init__(self, spec: QuantSpec, head_dim: int | None = None) -> None:
        self.spec = spec
        self.head_dim = head_dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if self.head_dim is None:
            return fake_quantize_activation(out, self.spec, per_token=True)
        heads = out.reshape(*out.shape[:-1], -1, self.head_dim)
        return fake_quantize_activation(heads, self.spec, per_token=True).reshape(out.shape)

    def to_dict(self) -> dict:
        return {"spec": self.spec.model_dump(), "head_dim": self.head_dim}


def attach_output_quantizers(model: nn.Module, table: dict[str, dict]) -> list[RemovableHandle]:
    """table: module name -> OutputQuantizer.to_dict(), as written in quantshift.json."""
    modules = dict(model.named_modules())
    handles = []
    for name, entry in table.items():
        if name not in modules:
            raise KeyError(f"quantized checkpoint names module {name!r} that the model does not have")
        q = OutputQuantizer(QuantSpec(**entry["spec"]), entry.get("head_dim"))
        handles.append(modules[name].register_forward_hook(q))
    return handles


def attach_input_quantizer(linear: nn.Module, spec: QuantSpec, per_token: bool = True) -> RemovableHandle:
    return linear.register_forward_pre_hook(InputQuantizer(spec, per_token))


def attach_input_quantizers(model: nn.Module, table: dict[str, dict]) -> list[RemovableHandle]:
    """table: module name -> {"spec": {...}, "per_token": bool} as written in quantshift.json."""
    modules = dict(model.named_modules())
    handles = []
    for name, entry in table.items():
        if name not in modules:
            raise KeyError(f"quantized checkpoint names module {name!r} that the model does not have")
        q = InputQuantizer(QuantSpec(**entry["spec"]), entry.get("per_token", True), entry.get("static_scale"))
        handles.append(modules[name].register_forward_pre_hook(q))
    return handles
