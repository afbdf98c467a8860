"""Sampled per-layer timing: hooks around every layer of one eager forward pass.

A "layer" is a conv op (whatever backend runs it) or any other leaf module (pool, linear,
activation...). The hooks exist only for the profiled pass; other batches run without them.
On CUDA each layer is bracketed by CUDA events on the current stream and read after one
synchronize at the end, so the timed pass itself never waits between layers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.engine.backends import ConvOp

# Checked in order, so subclasses (ReLU6 is a Hardtanh) must come before their bases.
_OP_NAMES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "linear"),
    (nn.Conv2d, "conv_torch"),
    (nn.modules.pooling._MaxPoolNd, "pool"),
    (nn.modules.pooling._AvgPoolNd, "pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "pool"),
    (nn.modules.batchnorm._BatchNorm, "batchnorm"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.ReLU, "activation"),
    (nn.ReLU6, "activation"),
    (nn.Hardtanh, "activation"),
    (nn.SiLU, "activation"),
    (nn.Hardswish, "activation"),
    (nn.Sigmoid, "activation"),
    (nn.GELU, "activation"),
    (nn.Softmax, "softmax"),
    (nn.Flatten, "reshape"),
    (nn.modules.padding._ConstantPadNd, "pad"),
    (nn.Identity, "identity"),
)

LayerRecord = tuple[str, str, float]  # layer, op, seconds


def op_name(module: nn.Module) -> str:
    if isinstance(module, ConvOp):
        return module.op_kind  # AutoConv sets it to the op it just ran
    for cls, name in _OP_NAMES:
        if isinstance(module, cls):
            return name
    return type(module).__name__.lower()


def profiled_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv ops as units, plus every leaf module outside them."""
    layers: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, ConvOp):
            inside.append(name)
            layers.append((name, module))
        elif name and not any(True for _ in module.children()):
            layers.append((name, module))
    return layers


class LayerProfiler:
    """Times every layer of one call of `fn`; reusable for many calls."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.layers = profiled_layers(model)
        self.cuda = device.type == "cuda"

    def run(self, fn: Callable[[], Any]) -> tuple[Any, list[LayerRecord]]:
        marks: list[tuple[str, str, Any, Any]] = []
        starts: dict[str, Any] = {}
        stamp = self._stamp
        # Ops can be shared between backends' models (sparse plans are), and another runner's
        # thread may call them meanwhile: only this thread's calls are this pass's layers.
        owner = threading.get_ident()

        def before(name: str) -> Callable:
            def hook(module: nn.Module, args: Any) -> None:
                if threading.get_ident() == owner:
                    starts[name] = stamp()

            return hook

        def after(name: str) -> Callable:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if threading.get_ident() == owner and name in starts:
                    marks.append((name, op_name(module), starts.pop(name), stamp()))

            return hook

        handles = []
        try:
            for name, module in self.layers:
                handles.append(module.register_forward_pre_hook(before(name)))
                handles.append(module.register_forward_hook(after(name)))
            output = fn()
        finally:
            for handle in handles:
                handle.remove()
        if self.cuda:
            torch.cuda.current_stream().synchronize()
            records = [(n, op, s.elapsed_time(e) / 1e3) for n, op, s, e in marks]
        else:
            records = [(n, op, e - s) for n, op, s, e in marks]
        return output, records

    def _stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()
