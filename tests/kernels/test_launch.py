"""The eager launch path on CPU, with the driver stubbed: what reaches cuLaunchKernel.

The kernel itself is checked on a GPU (test_cuda.py); here a recording stand-in for CuPy's
driver module shows that a launch record sends the right handle, grid, block, shared bytes,
stream and argument array, and that the per-call pointers land where the array points."""

from __future__ import annotations

import ctypes
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from service.kernels import SparseConvPlan, tiled
from service.kernels import cuda as cuda_backend
from service.kernels import launch as kernel_launch
from service.kernels.tiled_meta import build_meta
from service.kernels.tiling import default_config

STREAM = 0x5EED


class _FakeCuda(torch.Tensor):
    """A CPU tensor that passes the plan's "is this on cuda:0" checks."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    is_cuda = True

    def get_device(self) -> int:
        return 0


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    state = SimpleNamespace(calls=[], device=0, entered=[])

    class _Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            state.entered.append(self.index)

        def __exit__(self, *exc: object) -> None:
            return None

    cp = SimpleNamespace(
        cuda=SimpleNamespace(
            Device=_Device,
            runtime=SimpleNamespace(getDevice=lambda: state.device, setDevice=lambda d: None),
            driver=SimpleNamespace(launchKernel=lambda *args: state.calls.append(args)),
        )
    )
    monkeypatch.setattr(cuda_backend, "_cupy", lambda: cp)
    monkeypatch.setattr(cuda_backend, "get_kernel", lambda d, n: SimpleNamespace(ptr=0xF00D))
    monkeypatch.setattr(kernel_launch, "_current_raw_stream", lambda d: STREAM)
    return state


def _layer(seed: int = 0) -> tuple[SparseConvPlan, kernel_launch.KernelLaunch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 8, 3, 3, generator=g)
    weight[torch.rand(weight.shape, generator=g) < 0.8] = 0
    plan = SparseConvPlan(weight, torch.randn(16, generator=g), padding=1)
    entry = plan._prepare_geometry((12, 12))
    # One split: the workspace of a split launch would be allocated on a GPU.
    config = dataclasses.replace(default_config(entry.geometry, 2, plan.density), splits=1)
    meta = build_meta(plan._sparse, entry.geometry, config)
    launch = tiled.TILED.prepare_launch(entry.geometry, meta, config, plan._bias, 2, "relu", 0)
    x = torch.randn(2, 8, 12, 12, generator=g)
    return plan, launch, x


def _words(address: int, count: int) -> list[int]:
    return list((ctypes.c_uint64 * count).from_address(address))


def test_launch_sends_the_prepared_record(driver: SimpleNamespace) -> None:
    plan, launch, x = _layer()
    out = torch.empty(launch.out_shape)
    residual = torch.empty(launch.out_shape)
    assert kernel_launch.run_launch(launch, x, out, residual) is out
    (args,) = driver.calls
    grid = tiled.launch_grid(plan.geometry((12, 12)), launch.meta, 2)
    assert args == (
        0xF00D,
        *grid,
        launch.meta.config.threads,
        1,
        1,
        launch.shared_bytes,
        STREAM,
        launch.arg_address,
        0,
    )
    # The argument array points at the three pointer slots and at the params struct.
    pointers = _words(launch.arg_address, 4)
    assert [_words(p, 1)[0] for p in pointers[:3]] == [
        x.data_ptr(),
        out.data_ptr(),
        residual.data_ptr(),
    ]
    assert pointers[3] == launch.record.ctypes.data
    expected = tiled.kernel_params(plan.geometry((12, 12)), launch.meta, 2, "relu")
    for name in ("N", "C", "K", "OH", "OW", "TH", "TW", "rec_stride", "record_max", "act"):
        assert int(launch.record[name][0]) == expected[name], name
    assert int(launch.record["meta"][0]) == launch.meta.meta.data_ptr()

    # A second call patches only the pointers; no residual sends a null pointer.
    x2, out2 = torch.randn_like(x), torch.empty(launch.out_shape)
    kernel_launch.run_launch(launch, x2, out2, None)
    assert driver.calls[1] == args
    assert [_words(p, 1)[0] for p in pointers[:3]] == [x2.data_ptr(), out2.data_ptr(), 0]


def test_launch_on_another_current_device_switches_to_its_own(driver: SimpleNamespace) -> None:
    _, launch, x = _layer()
    driver.device = 1
    kernel_launch.run_launch(launch, x, torch.empty(launch.out_shape), None)
    assert driver.entered == [0]
    assert len(driver.calls) == 1


def test_plan_hot_path_fires_the_cached_launch(driver: SimpleNamespace) -> None:
    plan, launch, x = _layer(1)
    xc = x.as_subclass(_FakeCuda)
    plan._fast[(xc.shape, xc.dtype, "relu")] = launch
    plan._device_index = 0
    y = plan(xc, activation="relu")
    assert tuple(y.shape) == launch.out_shape and y.dtype == torch.float32
    (args,) = driver.calls
    slots = _words(launch.arg_address, 4)
    assert _words(slots[0], 1)[0] == xc.data_ptr()
    assert _words(slots[1], 1)[0] == y.data_ptr()

    # Anything the record was not prepared for leaves the hot path (here: for the reference).
    for other in (x.double(), x.transpose(2, 3)):  # dtype, layout
        got = plan(other.as_subclass(_FakeCuda), activation="relu")
        expected = plan(other.float(), activation="relu", impl="reference")
        torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
    plan(xc, activation=None)  # no record for this activation
    plan(xc, activation="relu", impl="reference")
    assert len(driver.calls) == 1
