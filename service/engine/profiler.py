"""Sampled per-layer timing: hooks around every layer of one eager forward pass.

A "layer" is a conv op (whatever backend runs it) or any other leaf module (pool, linear,
activation...). The hooks exist only for the profiled pass; other batches run without them.

On CUDA, events around a layer measure device time only if the layer's kernels are already
queued when the GPU reaches the start event. A busy server's host runs the eager forward slowly
(Python, a shared GIL), so the GPU otherwise idles inside the interval and host gaps get
reported as layer time (issue 10). So the host is kept ahead of the device: before each
layer's start event a short GPU busy-wait (`torch.cuda._sleep`) is queued, sized from the
layer's measured host time, so that the host has queued the whole layer (and its end event)
before the GPU leaves the busy-wait. Each interval then holds only that layer's kernels,
back to back, as in a CUDA graph replay.

Exactness is checked, not assumed: the GPU cannot run a busy-wait before the host queues it,
and a busy-wait of `seconds * peak cycles/us` cycles lasts at least `seconds`, so each start
event bounds from below where the GPU timeline sits on the host clock (`exact_layers`). A layer
whose end event was queued too late for that bound is dropped from the pass (device time does
not depend on host timing, so dropping does not bias the samples); the next pass sizes its
busy-wait from the host time just seen (the median of the last few passes).

On CUDA with graphs there is a better way, used first (`capture_layer_events`): events around
every layer captured into a second CUDA graph per batch bucket. A sampled batch replays that
graph instead of the plain one: its layers run back to back as in any replay, the events add a
few microseconds, and the host does no more than for any batch. The eager pass below stays for
the CPU and for a bucket whose graph could not be captured. (The eager pass held the engine
thread for tens of milliseconds, host time on a busy process, and every batch queued behind
it waited: on the H200 that pause, every 1,000 batches, was what made p99 at 70% of
saturation, run 6 in docs/service.md.)

Cost of an eager profiled pass, once every N batches: about sum(sleep) + sum(device time). The sleeps
fill time the GPU would idle anyway while the slow host launches the layers, so the pass takes
about as long as the eager forward's host time plus a margin (~50 us or half a layer's host time
per layer). Without `torch.cuda._sleep` it falls back to plain events around each layer.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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

DEFAULT_HOST_S = 200e-6  # host time assumed for a layer not seen yet (first pass)
MIN_LEAD_S = 50e-6  # least lead of the host over the GPU, on top of the layer's host time
MAX_SLEEP_S = 5e-3  # cap on one busy-wait (one GIL switch interval)
SUBMIT_LATENCY_S = 20e-6  # a launch returns on the host before the GPU can see it
CREDIT = 0.8  # sleeps and device times count at 80% when predicting where the GPU is
HISTORY = 5  # host times kept per layer; their median sizes the next sleep
_CAL_CYCLES = 2_000_000

_rates: dict[int, float] = {}
_rates_lock = threading.Lock()


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


# ------------------------------------------------------------ sizing (pure functions)


def host_budget(samples: Sequence[float], default: float = DEFAULT_HOST_S) -> float:
    """Host seconds a layer is expected to take: the median of its recent passes (a GIL
    preemption in one pass must not size every later sleep), or `default` before any."""
    return statistics.median(samples) if samples else default


def sleep_seconds(
    host_s: float, lag_s: float, *, min_lead_s: float = MIN_LEAD_S, cap_s: float = MAX_SLEEP_S
) -> float:
    """Busy-wait to queue before a layer so the GPU reaches its start event only after the host
    has queued the layer: its host time plus a lead, less what the GPU is already behind."""
    need = host_s + max(min_lead_s, 0.5 * host_s) + SUBMIT_LATENCY_S
    return min(cap_s, max(0.0, need - max(0.0, lag_s)))


def sleep_cycles(seconds: float, cycles_per_us: float) -> int:
    return max(0, int(seconds * 1e6 * cycles_per_us))


def exact_layers(
    host_before: Sequence[float],
    host_after: Sequence[float],
    device_start: Sequence[float],
    min_sleep: Sequence[float] | None = None,
    latency_s: float = SUBMIT_LATENCY_S,
) -> list[bool]:
    """Which layers' intervals hold only their own device work.

    host_before[i]: host clock before layer i's busy-wait and start event were queued;
    host_after[i]: host clock after its end event was queued; device_start[i]: its start event
    on the device, in seconds from the first layer's; min_sleep[i]: the least time its
    busy-wait can run. Start event k runs after its busy-wait, which starts no earlier than it
    was queued, so the first start event ran at or after
    origin = max_k(host_before[k] + min_sleep[k] - device_start[k]) on the host clock. Layer i
    is exact when the host had queued all of it before the GPU could reach its start event:
    host_after[i] + latency <= origin + device_start[i].
    """
    if not host_before:
        return []
    sleeps = min_sleep if min_sleep is not None else [0.0] * len(host_before)
    origin = max(h + s - t for h, s, t in zip(host_before, sleeps, device_start, strict=True))
    return [
        after + latency_s <= origin + start
        for after, start in zip(host_after, device_start, strict=True)
    ]


def cycles_per_us(device: torch.device) -> float | None:
    """An upper bound on the `torch.cuda._sleep` clock (cycles per microsecond), so a busy-wait
    of `seconds * rate` cycles lasts at least `seconds`; None without the private API.

    The sleep counts SM clock cycles: the device's peak clock bounds that rate. It is checked
    against a measure, taken once per device on the current stream, in case the reported peak
    is missing or wrong; with no peak the measure plus 15% (boost headroom) is used."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _rates_lock:
        if index not in _rates:
            with torch.cuda.device(index):
                # A first busy-wait keeps the GPU busy (and its clocks up) while the timed one
                # and its events are queued, so no host gap lands inside the measure.
                torch.cuda._sleep(_CAL_CYCLES // 2)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(_CAL_CYCLES)
                end.record()
                end.synchronize()
                us = start.elapsed_time(end) * 1e3
            measured = _CAL_CYCLES / us if us > 0 else 0.0
            peak_khz = getattr(torch.cuda.get_device_properties(index), "clock_rate", 0) or 0
            _rates[index] = max(peak_khz / 1e3, measured) if peak_khz else 1.15 * measured
        rate = _rates[index]
    return rate if rate > 0 else None


# ------------------------------------------------------------ the profiler


@dataclass
class _Mark:
    name: str
    op: str
    host_before: float
    host_after: float
    start: Any  # CUDA event, or perf_counter on the CPU
    end: Any
    sleep_s: float
    batch: int


@dataclass
class PassStats:
    """What the last profiled pass did (for tests, logs and cost accounting)."""

    mode: str  # "cpu", "events" (no busy-wait available) or "ahead"
    layers: int = 0
    reported: int = 0
    dropped: list[str] = field(default_factory=list)
    host_s: float = 0.0  # wall time of the pass on the host
    sleep_s: float = 0.0  # busy-wait queued in all
    device_s: float = 0.0  # sum of the reported layers' times


class LayerProfiler:
    """Times every layer of one call of `fn`; reusable for many calls."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        default_host_s: float = DEFAULT_HOST_S,
        max_sleep_s: float = MAX_SLEEP_S,
    ) -> None:
        self.layers = profiled_layers(model)
        self.device = device
        self.cuda = device.type == "cuda"
        self.default_host_s = default_host_s
        self.max_sleep_s = max_sleep_s
        self._host: dict[str, deque[float]] = {}
        self._device: dict[tuple[str, int], float] = {}
        self.last_pass: PassStats | None = None
        self.last_pass_seconds = 0.0  # sum of the last pass's reported layer times

    def run(self, fn: Callable[[], Any]) -> tuple[Any, list[LayerRecord]]:
        rate = cycles_per_us(self.device) if self.cuda else None
        mode = "cpu" if not self.cuda else ("ahead" if rate else "events")
        marks: list[_Mark] = []
        starts: dict[str, tuple[float, Any, float, int]] = {}
        gpu_at = [0.0]  # host-clock time the GPU is predicted (from below) to reach
        # Ops can be shared between backends' models (sparse plans are), and another runner's
        # thread may call them meanwhile: only this thread's calls are this pass's layers.
        owner = threading.get_ident()

        def before(name: str) -> Callable:
            def hook(module: nn.Module, args: Any) -> None:
                if threading.get_ident() != owner:
                    return
                now = time.perf_counter()
                x = args[0] if args else None
                batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 0
                slept = 0.0
                if mode == "ahead":
                    host = host_budget(self._host.get(name, ()), self.default_host_s)
                    slept = sleep_seconds(host, gpu_at[0] - now, cap_s=self.max_sleep_s)
                    if slept > 0:
                        torch.cuda._sleep(sleep_cycles(slept, rate))
                    work = slept + self._device.get((name, batch), 0.0)
                    gpu_at[0] = max(gpu_at[0], now) + CREDIT * work
                starts[name] = (now, self._stamp(), slept, batch)  # last: nearest the call

            return hook

        def after(name: str) -> Callable:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if threading.get_ident() == owner and name in starts:
                    end = self._stamp()  # first: nearest the call
                    now, start, slept, batch = starts.pop(name)
                    done = time.perf_counter()
                    marks.append(_Mark(name, op_name(module), now, done, start, end, slept, batch))

            return hook

        t0 = time.perf_counter()
        handles = []
        try:
            for name, module in self.layers:
                handles.append(module.register_forward_pre_hook(before(name)))
                # Prepended, so the end event goes in before any other forward hook runs.
                handles.append(module.register_forward_hook(after(name), prepend=True))
            output = fn()
        finally:
            for handle in handles:
                handle.remove()
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        records = self._records(marks, mode, time.perf_counter() - t0)
        return output, records

    def _records(self, marks: list[_Mark], mode: str, host_s: float) -> list[LayerRecord]:
        stats = PassStats(mode, layers=len(marks), host_s=host_s)
        stats.sleep_s = sum(m.sleep_s for m in marks)
        if not self.cuda:
            seconds = [m.end - m.start for m in marks]
            exact = [True] * len(marks)
        else:
            first = marks[0].start if marks else None
            seconds = [m.start.elapsed_time(m.end) / 1e3 for m in marks]
            device_start = [first.elapsed_time(m.start) / 1e3 for m in marks]
            exact = exact_layers(
                [m.host_before for m in marks],
                [m.host_after for m in marks],
                device_start,
                [m.sleep_s for m in marks],  # the rate is an upper bound: at least this long
            )
            if mode == "events":  # the old behaviour: nothing to keep the host ahead
                exact = [True] * len(marks)
        records: list[LayerRecord] = []
        for mark, secs, ok in zip(marks, seconds, exact, strict=True):
            # The busy-wait is asynchronous: this is the host's own time for the layer.
            history = self._host.setdefault(mark.name, deque(maxlen=HISTORY))
            history.append(mark.host_after - mark.host_before)
            if ok:
                self._device[(mark.name, mark.batch)] = secs
                records.append((mark.name, mark.op, secs))
            else:
                stats.dropped.append(mark.name)
        stats.reported = len(records)
        stats.device_s = sum(r[2] for r in records)
        self.last_pass, self.last_pass_seconds = stats, stats.device_s
        return records

    def _stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()


# ------------------------------------------------------------ events captured in a graph


@dataclass
class CapturedLayers:
    """The events a CUDA graph records around each layer, read after each replay."""

    marks: list[tuple[str, str, Any, Any]] = field(default_factory=list)  # name, op, start, end

    def records(self) -> list[LayerRecord]:
        """Each layer's device time in the graph's latest replay; call once it finished."""
        return [(name, op, start.elapsed_time(end) / 1e3) for name, op, start, end in self.marks]


def graph_events_supported() -> bool:
    """Whether this torch records timing events as nodes of a captured graph."""
    try:
        torch.cuda.Event(enable_timing=True, external=True)
    except (TypeError, RuntimeError):  # torch without the `external` flag, or no CUDA
        return False
    return True


@contextmanager
def capture_layer_events(model: nn.Module) -> Iterator[CapturedLayers]:
    """Within it, every profiled layer that the calling thread runs records a timing event
    before and after itself (`external`: inside a graph capture, each record is a node of the
    graph, so every replay times the layers again). Other threads' calls are left alone."""
    captured = CapturedLayers()
    owner = threading.get_ident()
    starts: dict[str, Any] = {}

    def before(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            if threading.get_ident() == owner:
                starts[name] = _external_event()

        return hook

    def after(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() == owner and name in starts:
                end = _external_event()
                captured.marks.append((name, op_name(module), starts.pop(name), end))

        return hook

    handles = []
    try:
        for name, module in profiled_layers(model):
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name), prepend=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _external_event() -> Any:
    event = torch.cuda.Event(enable_timing=True, external=True)
    event.record()
    return event
