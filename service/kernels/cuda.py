"""Compiling the Escort CUDA kernels through CuPy, and whether they can run here.

CuPy is imported lazily, so the package imports without it. Every registered variant's
instantiations (variants.py) are compiled once per device, in one NVRTC call, and cached;
launches are built and fired by launch.py on torch's memory and streams.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import threading
from typing import Any

import torch


class CudaUnavailableError(RuntimeError):
    """impl="cuda" was asked for where the CUDA kernel cannot run; the message says why."""


@functools.cache
def _cupy() -> Any:
    return importlib.import_module("cupy")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the CUDA kernel cannot run here, or None when it can (checked once per process)."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'escort-serve[gpu]', i.e. cupy-cuda13x)"
    try:
        _cupy()
    except Exception as exc:  # a broken CuPy install raises all sorts
        return f"CuPy failed to import: {exc}"
    return None


def cuda_available() -> bool:
    """True when the Escort CUDA kernel can run: a CUDA device and an importable CuPy."""
    return unavailable_reason() is None


def require_cuda() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise CudaUnavailableError(f"the Escort CUDA kernel cannot run: {reason}")


_lock = threading.Lock()
_modules: dict[int, Any] = {}


def _module(device_index: int) -> Any:
    """The compiled RawModule for one device (NVRTC runs once per device and process; CuPy
    also keeps the binary in its on-disk kernel cache)."""
    module = _modules.get(device_index)
    if module is not None:
        return module
    from service.kernels.variants import VARIANTS, sources  # noqa: PLC0415 - they import us

    cp = _cupy()
    names = [name for variant in VARIANTS for name in variant.kernel_names]
    with _lock:
        module = _modules.get(device_index)
        if module is None:
            with cp.cuda.Device(device_index):
                module = cp.RawModule(
                    code=sources(),
                    options=("-std=c++17",),
                    name_expressions=names,
                )
                for name in names:  # load now, not in a capture
                    module.get_function(name)
            _modules[device_index] = module
    return module


def compile_kernels(device_index: int) -> None:
    """Compile (or load from CuPy's cache) every variant for one device, now."""
    _module(device_index)


_functions: dict[tuple[int, str], Any] = {}


def get_kernel(device_index: int, name: str) -> Any:
    """The loaded kernel function (cupy Function) for one device."""
    key = (device_index, name)
    function = _functions.get(key)
    if function is None:
        module = _module(device_index)
        with _cupy().cuda.Device(device_index):
            raw = module.get_function(name)
            # RawKernel.kernel is the per-device Function; calling it directly skips a layer.
            function = getattr(raw, "kernel", raw)
        _functions[key] = function
    return function
