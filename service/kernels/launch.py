"""A ready kernel launch: everything bound beforehand, one driver call per layer and batch.

Every kernel variant (variants.py) takes the same first three arguments, the per-call
pointers x, out and residual, and a parameter struct of its own as the fourth. `assemble_launch`
builds the record once (outside any capture); `KernelLaunch.fire` then writes three pointers
and calls cuLaunchKernel on torch's current stream, so a launch can be captured in a torch
CUDA graph.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.kernels import cuda

ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}


@dataclass
class KernelLaunch:
    """One ready launch of a kernel variant for (geometry, config, batch, activation).

    `slots` holds the three per-call pointers (x, out, residual) and `arg_pointers` is the
    void*[4] array cuLaunchKernel reads, pointing at the slots and at the params struct. `fire`
    is the launch itself with every constant bound: a call writes three integers, checks the
    thread's current device and makes one driver call. Not for concurrent use from two threads."""

    function: Any  # cupy Function
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    record: np.ndarray  # the variant's parameter struct
    slots: Any  # ctypes uint64[3]
    arg_pointers: Any  # ctypes void*[4]
    arg_address: int  # its address, for the launch call
    function_ptr: int  # the CUfunction handle
    meta: Any  # the variant's metadata, kept alive: `record` holds its device pointers
    keep: tuple[torch.Tensor | None, ...]  # bias (and the split workspace and counters)
    device_index: int
    out_shape: tuple[int, int, int, int]
    fire: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.fire = _make_fire(self)


def assemble_launch(
    kernel: str,
    device_index: int,
    grid: tuple[int, int, int],
    threads: int,
    shared_bytes: int,
    params_dtype: np.dtype,
    params: dict[str, int],
    meta: Any,
    keep: tuple[torch.Tensor | None, ...],
    out_shape: tuple[int, int, int, int],
) -> KernelLaunch:
    """A launch of compiled kernel `kernel` whose first three arguments are the per-call
    pointers (x, out, residual) and whose fourth is the struct `params` fills: every variant's
    launch is built here, outside any capture."""
    record = np.zeros(1, dtype=params_dtype)
    for key, value in params.items():
        record[key] = value
    slots = (ctypes.c_uint64 * 3)()
    base = ctypes.addressof(slots)
    arg_pointers = (ctypes.c_void_p * 4)(base, base + 8, base + 16, record.ctypes.data)
    function = cuda.get_kernel(device_index, kernel)
    return KernelLaunch(
        function=function,
        grid=grid,
        block=(threads, 1, 1),
        shared_bytes=shared_bytes,
        record=record,
        slots=slots,
        arg_pointers=arg_pointers,
        arg_address=ctypes.addressof(arg_pointers),
        function_ptr=int(function.ptr),
        meta=meta,
        keep=keep,
        device_index=device_index,
        out_shape=out_shape,
    )


_local = threading.local()


_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _raw_stream(device_index: int) -> int:
    """torch's current stream on the device, as a handle (what triton reads too)."""
    if _current_raw_stream is not None:
        return _current_raw_stream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def _ready_devices() -> set[int]:
    """Devices whose context this thread has made current (see `_make_fire`)."""
    ready = getattr(_local, "devices", None)
    if ready is None:
        ready = _local.devices = set()
    return ready


def _make_fire(
    launch: KernelLaunch,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The per-call launch as a closure: every constant (function handle, grid, block, shared
    bytes, argument array, driver entry points) is a local, so a call does no attribute or
    module lookups beyond the tensors' data pointers and the stream handle. CuPy is resolved
    on the first call, not here, so records can be built and inspected without it."""
    slots = launch.slots
    device = launch.device_index
    gx, gy, gz = launch.grid
    bx = launch.block[0]
    shared = launch.shared_bytes
    function_ptr = launch.function_ptr
    arg_address = launch.arg_address
    stream_of = _current_raw_stream if _current_raw_stream is not None else _raw_stream
    local = _local
    bound: list[Any] = []

    def fire(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if not bound:
            cp = cuda._cupy()
            bound.extend((cp.cuda.driver.launchKernel, cp.cuda.runtime.getDevice))
        launch_kernel, get_device = bound
        slots[0] = x.data_ptr()
        slots[1] = out.data_ptr()
        slots[2] = 0 if residual is None else residual.data_ptr()
        stream = stream_of(device)
        if get_device() != device:
            cp = cuda._cupy()
            with cp.cuda.Device(device):
                launch_kernel(function_ptr, gx, gy, gz, bx, 1, 1, shared, stream, arg_address, 0)
            return out
        ready = getattr(local, "devices", None)
        if ready is None or device not in ready:
            # The driver launch needs the device's context current on this thread; since
            # CUDA 12, cudaSetDevice makes the primary context current.
            cuda._cupy().cuda.runtime.setDevice(device)
            _ready_devices().add(device)
        launch_kernel(function_ptr, gx, gy, gz, bx, 1, 1, shared, stream, arg_address, 0)
        return out

    return fire


def run_launch(
    launch: KernelLaunch,
    x: torch.Tensor,
    out: torch.Tensor,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """Launches on torch's current stream; no sync, no allocation. Tensors must be fp32,
    contiguous, on the launch's device, with the shapes it was prepared for."""
    return launch.fire(x, out, residual)
