"""Compiling and launching the Escort CUDA kernel through CuPy, on torch's memory and streams.

CuPy is imported lazily, so the package imports without it. Kernels are compiled once per
device (one NVRTC call for every instantiation) and cached. A launch reads torch data_ptr()s,
runs on torch's current stream and allocates nothing itself, so it can be captured in a torch
CUDA graph; everything a launch needs (metadata on the device, the packed parameter struct) is
built beforehand by `prepare_launch`, outside any capture.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.kernels.escort_cuda import KERNEL_NAMES, PORT_NAME, SOURCE, kernel_name
from service.kernels.stretched_csr import ConvGeometry
from service.kernels.tiling import EscortMeta, magic_divisor

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
                    code=SOURCE,
                    options=("-std=c++17",),
                    name_expressions=[*KERNEL_NAMES],
                )
                for name in KERNEL_NAMES:  # load now, not during a graph capture
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


_PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in ("meta", "segptr", "perm", "blocks", "bias")]
    + [
        (name, np.int32)
        for name in [
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
            "tiles_w",
            "tiles_h",
            "seg_stride",
            "chunk_floats",
            "act",
        ]
    ]
    + [
        (name, np.uint32)
        for name in ["tiw_mul", "tiw_shr", "tih_mul", "tih_shr", "cc_mul", "cc_shr"]
    ],
    align=True,
)


def _struct_arg(record: np.ndarray) -> Any:
    """A kernel argument passing `record` (one C struct) by value, converted once."""
    function = importlib.import_module("cupy.cuda.function")
    holder = getattr(function, "CNumpyArray", None)
    # CuPy also accepts a one-element ndarray by value; pre-wrapping skips the per-call check.
    return holder(record) if holder is not None else record


@dataclass
class EscortLaunch:
    """One ready launch of escort_conv for (geometry, config, batch, activation)."""

    kernel: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    params: Any  # the struct argument
    record: np.ndarray  # kept alive: `params` points into it
    meta: EscortMeta  # kept alive: `record` holds its device pointers
    bias: torch.Tensor | None
    device_index: int
    out_shape: tuple[int, int, int, int]


def kernel_params(
    geometry: ConvGeometry,
    meta: EscortMeta,
    bias: torch.Tensor | None,
    batch: int,
    activation: str | None,
) -> dict[str, int]:
    """The EscortParams fields for one launch (device pointers included)."""
    config = meta.config
    tih, tiw = meta.window
    oh, ow = geometry.output_hw
    _, h_t, w_t = config.tiles(geometry, batch)
    tiw_div, tih_div = magic_divisor(tiw), magic_divisor(tih)
    cc_div = magic_divisor(config.chunk_channels)
    left, _, top, _ = geometry.padding
    return {
        "meta": meta.meta.data_ptr(),
        "segptr": meta.segptr.data_ptr(),
        "perm": meta.perm.data_ptr(),
        "blocks": meta.blocks.data_ptr(),
        "bias": 0 if bias is None else bias.data_ptr(),
        "N": batch,
        "C": geometry.in_channels,
        "H": geometry.input_hw[0],
        "W": geometry.input_hw[1],
        "K": geometry.out_channels,
        "OH": oh,
        "OW": ow,
        "sh": geometry.stride[0],
        "sw": geometry.stride[1],
        "pt": top,
        "pl": left,
        "TH": config.tile_h,
        "TW": config.tile_w,
        "NB": config.images,
        "TIH": tih,
        "TIW": tiw,
        "CC": config.chunk_channels,
        "tiles_w": w_t,
        "tiles_h": h_t,
        "seg_stride": meta.seg_stride,
        "chunk_floats": config.chunk_floats(geometry),
        "act": ACTIVATION_CODES[activation],
        "tiw_mul": tiw_div[0],
        "tiw_shr": tiw_div[1],
        "tih_mul": tih_div[0],
        "tih_shr": tih_div[1],
        "cc_mul": cc_div[0],
        "cc_shr": cc_div[1],
    }


def launch_grid(geometry: ConvGeometry, meta: EscortMeta, batch: int) -> tuple[int, int, int]:
    n_t, h_t, w_t = meta.config.tiles(geometry, batch)
    return (n_t * h_t * w_t, meta.config.row_blocks(geometry), 1)


def prepare_launch(
    geometry: ConvGeometry,
    meta: EscortMeta,
    bias: torch.Tensor | None,
    batch: int,
    activation: str | None,
    device_index: int,
) -> EscortLaunch:
    """Everything a launch needs. `meta` and `bias` must already be on the device."""
    config = meta.config
    values = kernel_params(geometry, meta, bias, batch, activation)
    record = np.zeros(1, dtype=_PARAMS_DTYPE)
    for key, value in values.items():
        record[key] = value
    kernel = get_kernel(device_index, kernel_name(config.pixels_per_lane, config.rows_per_warp))
    return EscortLaunch(
        kernel=kernel,
        grid=launch_grid(geometry, meta, batch),
        block=(config.threads, 1, 1),
        shared_bytes=2 * values["chunk_floats"] * 4,
        params=_struct_arg(record),
        record=record,
        meta=meta,
        bias=bias,
        device_index=device_index,
        out_shape=(batch, geometry.out_channels, *geometry.output_hw),
    )


_streams: dict[int, Any] = {}


@functools.cache
def _intptr() -> Any:
    return importlib.import_module("cupy.cuda.function").CIntptr


def _current_stream(device: torch.device) -> Any:
    handle = torch.cuda.current_stream(device).cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        stream = _cupy().cuda.ExternalStream(handle, device.index or 0)
        _streams[handle] = stream
    return stream


def run_launch(
    launch: EscortLaunch,
    x: torch.Tensor,
    out: torch.Tensor,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """Launches on torch's current stream; no sync, no allocation. Tensors must be fp32,
    contiguous, on the launch's device, with the shapes it was prepared for."""
    intptr = _intptr()
    args = (
        intptr(x.data_ptr()),
        intptr(out.data_ptr()),
        intptr(0 if residual is None else residual.data_ptr()),
        launch.params,
    )
    cp = _cupy()
    if cp.cuda.runtime.getDevice() != launch.device_index:
        with cp.cuda.Device(launch.device_index):
            launch.kernel(
                launch.grid,
                launch.block,
                args,
                shared_mem=launch.shared_bytes,
                stream=_current_stream(x.device),
            )
    else:
        launch.kernel(
            launch.grid,
            launch.block,
            args,
            shared_mem=launch.shared_bytes,
            stream=_current_stream(x.device),
        )
    return out


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
        stream=_current_stream(x_padded.device),
    )
    return out
