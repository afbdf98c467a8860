"""Compiling and launching the Escort CUDA kernel through CuPy, on torch's memory and streams.

CuPy is imported lazily, so the package imports without it. Kernels are compiled once per
device (one NVRTC call for every instantiation) and cached. A launch reads torch data_ptr()s,
runs on torch's current stream and allocates nothing itself, so it can be captured in a torch
CUDA graph; everything a launch needs (metadata on the device, the packed parameter struct) is
built beforehand by `prepare_launch`, outside any capture.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.kernels.direct_cuda import DIRECT_KERNEL_NAMES, DIRECT_SOURCE
from service.kernels.escort_cuda import KERNEL_NAMES, PORT_NAME, SOURCE, kernel_name
from service.kernels.stretched_csr import ConvGeometry
from service.kernels.tiling import EscortMeta

ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}


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
    cp = _cupy()
    with _lock:
        module = _modules.get(device_index)
        if module is None:
            with cp.cuda.Device(device_index):
                module = cp.RawModule(
                    code=SOURCE + DIRECT_SOURCE,
                    options=("-std=c++17",),
                    name_expressions=[*KERNEL_NAMES, *DIRECT_KERNEL_NAMES],
                )
                for name in (*KERNEL_NAMES, *DIRECT_KERNEL_NAMES):  # load now, not in a capture
                    module.get_function(name)
                module.get_function(PORT_NAME)
            _modules[device_index] = module
    return module


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


_POINTER_FIELDS = ("meta", "recptr", "perm", "blocks", "bias", "ws", "counters")
_INT_FIELDS = [
    "N",
    "C",
    "H",
    "W",
    "K",
    "OH",
    "OW",
    "sh",
    "sw",
    "pt",
    "pl",
    "TH",
    "TW",
    "NB",
    "TIH",
    "TIW",
    "CC",
    "pitch",
    "tiles_w",
    "tiles_h",
    "rec_stride",
    "header",
    "chunk_floats",
    "record_max",
    "splits",
    "act",
]
# The EscortParams struct of the CUDA source, field for field (aligned as C lays it out).
PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in _POINTER_FIELDS] + [(name, np.int32) for name in _INT_FIELDS],
    align=True,
)


def kernel_params(
    geometry: ConvGeometry,
    meta: EscortMeta,
    batch: int,
    activation: str | None,
    pointers: dict[str, int] | None = None,
) -> dict[str, int]:
    """The EscortParams fields for one launch; device pointers default to 0."""
    config = meta.config
    tih, tiw = meta.window
    oh, ow = geometry.output_hw
    _, h_t, w_t = config.tiles(geometry, batch)
    left, _, top, _ = geometry.padding
    values = dict.fromkeys(_POINTER_FIELDS, 0)
    values.update(pointers or {})
    values.update(
        N=batch,
        C=geometry.in_channels,
        H=geometry.input_hw[0],
        W=geometry.input_hw[1],
        K=geometry.out_channels,
        OH=oh,
        OW=ow,
        sh=geometry.stride[0],
        sw=geometry.stride[1],
        pt=top,
        pl=left,
        TH=config.tile_h,
        TW=config.tile_w,
        NB=config.images,
        TIH=tih,
        TIW=tiw,
        CC=config.chunk_channels,
        pitch=config.row_pitch(geometry),
        tiles_w=w_t,
        tiles_h=h_t,
        rec_stride=meta.rec_stride,
        header=config.header_slots(),
        chunk_floats=config.chunk_floats(geometry),
        record_max=meta.record_max,
        splits=config.splits,
        act=ACTIVATION_CODES[activation],
    )
    return values


def launch_grid(geometry: ConvGeometry, meta: EscortMeta, batch: int) -> tuple[int, int, int]:
    n_t, h_t, w_t = meta.config.tiles(geometry, batch)
    return (n_t * h_t * w_t, meta.config.row_blocks(geometry), meta.config.splits)


def shared_bytes(geometry: ConvGeometry, meta: EscortMeta) -> int:
    return 2 * (4 * meta.config.chunk_floats(geometry) + 8 * meta.record_max)


@dataclass
class EscortLaunch:
    """One ready launch of escort_conv or escort_direct for (geometry, config, batch,
    activation).

    `slots` holds the three per-call pointers (x, out, residual) and `arg_pointers` is the
    void*[4] array cuLaunchKernel reads, pointing at the slots and at the params struct. `fire`
    is the launch itself with every constant bound: a call writes three integers, checks the
    thread's current device and makes one driver call. Not for concurrent use from two threads."""

    function: Any  # cupy Function
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    record: np.ndarray  # the EscortParams struct
    slots: Any  # ctypes uint64[3]
    arg_pointers: Any  # ctypes void*[4]
    arg_address: int  # its address, for the launch call
    function_ptr: int  # the CUfunction handle
    meta: Any  # EscortMeta or DirectMeta, kept alive: `record` holds its device pointers
    keep: tuple[torch.Tensor | None, ...]  # bias (and the split workspace and counters)
    device_index: int
    out_shape: tuple[int, int, int, int]
    fire: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.fire = _make_fire(self)


def prepare_launch(
    geometry: ConvGeometry,
    meta: EscortMeta,
    bias: torch.Tensor | None,
    batch: int,
    activation: str | None,
    device_index: int,
) -> EscortLaunch:
    """Everything a launch needs (allocates the split workspace, so not during a capture).
    `meta` and `bias` must already be on the device."""
    config = meta.config
    grid = launch_grid(geometry, meta, batch)
    out_shape = (batch, geometry.out_channels, *geometry.output_hw)
    ws = counters = None
    if config.splits > 1:
        device = torch.device("cuda", device_index)
        ws = torch.zeros(out_shape, device=device)
        counters = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=device)
    pointers = {
        "meta": meta.meta.data_ptr(),
        "recptr": meta.recptr.data_ptr(),
        "perm": meta.perm.data_ptr(),
        "blocks": meta.blocks.data_ptr(),
        "bias": 0 if bias is None else bias.data_ptr(),
        "ws": 0 if ws is None else ws.data_ptr(),
        "counters": 0 if counters is None else counters.data_ptr(),
    }
    record = np.zeros(1, dtype=PARAMS_DTYPE)
    for key, value in kernel_params(geometry, meta, batch, activation, pointers).items():
        record[key] = value
    slots = (ctypes.c_uint64 * 3)()
    base = ctypes.addressof(slots)
    arg_pointers = (ctypes.c_void_p * 4)(base, base + 8, base + 16, record.ctypes.data)
    function = get_kernel(device_index, kernel_name(config.pixels_per_lane, config.rows_per_warp))
    return EscortLaunch(
        function=function,
        grid=grid,
        block=(config.threads, 1, 1),
        shared_bytes=shared_bytes(geometry, meta),
        record=record,
        slots=slots,
        arg_pointers=arg_pointers,
        arg_address=ctypes.addressof(arg_pointers),
        function_ptr=int(function.ptr),
        meta=meta,
        keep=(bias, ws, counters),
        device_index=device_index,
        out_shape=out_shape,
    )


_local = threading.local()


@dataclass(frozen=True)
class _StreamRef:
    """What cupy's Function call reads from a stream argument: its handle."""

    ptr: int


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
    launch: EscortLaunch,
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
            cp = _cupy()
            bound.extend((cp.cuda.driver.launchKernel, cp.cuda.runtime.getDevice))
        launch_kernel, get_device = bound
        slots[0] = x.data_ptr()
        slots[1] = out.data_ptr()
        slots[2] = 0 if residual is None else residual.data_ptr()
        stream = stream_of(device)
        if get_device() != device:
            cp = _cupy()
            with cp.cuda.Device(device):
                launch_kernel(function_ptr, gx, gy, gz, bx, 1, 1, shared, stream, arg_address, 0)
            return out
        ready = getattr(local, "devices", None)
        if ready is None or device not in ready:
            # The driver launch needs the device's context current on this thread; since
            # CUDA 12, cudaSetDevice makes the primary context current.
            _cupy().cuda.runtime.setDevice(device)
            _ready_devices().add(device)
        launch_kernel(function_ptr, gx, gy, gz, bx, 1, 1, shared, stream, arg_address, 0)
        return out

    return fire


def run_launch(
    launch: EscortLaunch,
    x: torch.Tensor,
    out: torch.Tensor,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """Launches on torch's current stream; no sync, no allocation. Tensors must be fp32,
    contiguous, on the launch's device, with the shapes it was prepared for."""
    return launch.fire(x, out, residual)


def run_port(
    x_padded: torch.Tensor,
    out: torch.Tensor,
    rowptr: torch.Tensor,
    colidx: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    geometry: ConvGeometry,
) -> torch.Tensor:
    """The paper's sconv_shm (benchmark baseline). x_padded: [N, C, Hp, Wp] already padded;
    rowptr/colidx int32 and values fp32 of the stretched CSR, on the device."""
    n = x_padded.shape[0]
    hp, wp = geometry.padded_hw
    oh, ow = geometry.output_hw
    tiles_w, tiles_h = -(-ow // 16), -(-oh // 16)
    i32 = np.int32
    args = (
        x_padded,
        out,
        rowptr,
        colidx,
        values,
        bias,
        i32(geometry.in_channels),
        i32(hp),
        i32(wp),
        i32(geometry.out_channels),
        i32(oh),
        i32(ow),
        i32(geometry.stride[0]),
        i32(geometry.stride[1]),
        i32(geometry.outputs_per_group),
        i32(geometry.channels_per_group * hp * wp),
        i32(tiles_w),
    )
    ptrs = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    kernel = get_kernel(x_padded.device.index or 0, PORT_NAME)
    kernel(
        (tiles_w * tiles_h, geometry.out_channels, n),
        (16, 16, 1),
        ptrs,
        stream=_StreamRef(_raw_stream(x_padded.device.index or 0)),
    )
    return out
