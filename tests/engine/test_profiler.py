"""The sampled layer profiler: records, thread filtering, sleep sizing, the exactness check,
the host-ahead logic against a simulated GPU (CPU, in CI), and on a real GPU: agreement with
bench/layer_times within 25% while the host is slowed down."""

from __future__ import annotations

import statistics
import threading
import time

import pytest
import torch
import torchvision
from torch import nn

from service.engine import profiler as prof
from service.engine.profiler import (
    LayerProfiler,
    capture_layer_events,
    exact_layers,
    host_budget,
    sleep_cycles,
    sleep_seconds,
)
from tests.engine.conftest import magnitude_prune, randomize_batchnorm


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()


def test_one_record_per_layer_with_positive_times() -> None:
    model, x = tiny(), torch.randn(2, 3, 8, 8)
    p = LayerProfiler(model, torch.device("cpu"))
    out, records = p.run(lambda: model(x))
    assert out.shape == (2, 2)
    assert [(r[0], r[1]) for r in records] == [
        ("0", "conv_torch"), ("1", "activation"), ("2", "pool"), ("3", "reshape"), ("4", "linear"),
    ]  # fmt: skip
    assert all(r[2] > 0 for r in records)
    assert p.last_pass.mode == "cpu" and p.last_pass.reported == 5 and not p.last_pass.dropped
    assert p.run(lambda: model(x))[1][0][0] == "0"  # reusable; hooks were removed
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


class _StepEvent:
    """A CUDA event stand-in on the CPU: each record() reads the next tick of a clock (1 ms)."""

    ticks = iter(range(10_000))

    def __init__(self, enable_timing: bool = False, external: bool = False) -> None:
        assert enable_timing and external  # timing events that a graph capture keeps as nodes
        self.tick: int | None = None

    def record(self) -> None:
        self.tick = next(self.ticks)

    def elapsed_time(self, end: _StepEvent) -> float:
        assert self.tick is not None and end.tick is not None
        return float(end.tick - self.tick)


def test_captured_layer_events_time_each_layer_of_the_capturing_thread(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", _StepEvent)
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    with capture_layer_events(model) as captured:
        model(x)
        other = threading.Thread(target=lambda: model(x))  # e.g. another runner sharing ops
        other.start()
        other.join()
    records = captured.records()
    assert [(r[0], r[1]) for r in records] == [
        ("0", "conv_torch"), ("1", "activation"), ("2", "pool"), ("3", "reshape"), ("4", "linear"),
    ]  # fmt: skip
    # Each layer's end event is the record right after its start: one tick, 1 ms.
    assert [r[2] for r in records] == [1e-3] * 5
    model(x)
    assert len(captured.marks) == 5  # the hooks are gone
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_only_the_calling_threads_layers_are_recorded() -> None:
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    p = LayerProfiler(model, torch.device("cpu"))

    def fn() -> torch.Tensor:
        other = threading.Thread(target=lambda: model(x))  # e.g. another runner sharing ops
        other.start()
        other.join()
        return model(x)

    assert len(p.run(fn)[1]) == 5


def test_sleep_sizing() -> None:
    assert host_budget([]) == prof.DEFAULT_HOST_S
    assert host_budget([], default=1e-3) == 1e-3
    assert host_budget([1e-4, 9e-3, 2e-4]) == 2e-4  # one preempted pass does not size the next
    lat = prof.SUBMIT_LATENCY_S
    assert sleep_seconds(100e-6, 0.0) == pytest.approx(100e-6 + 50e-6 + lat)  # least lead
    assert sleep_seconds(1e-3, 0.0) == pytest.approx(1.5e-3 + lat)  # lead: half the host time
    assert sleep_seconds(1e-3, 1e-3) == pytest.approx(0.5e-3 + lat)  # the GPU is behind already
    assert sleep_seconds(1e-3, 1.0) == 0.0
    assert sleep_seconds(1e-3, -5.0) == sleep_seconds(1e-3, 0.0)  # an idle GPU gives no credit
    assert sleep_seconds(1.0, 0.0) == prof.MAX_SLEEP_S
    assert sleep_seconds(1.0, 0.0, cap_s=1e-3) == 1e-3
    assert sleep_cycles(1e-3, 1500.0) == 1_500_000 and sleep_cycles(-1.0, 1500.0) == 0


def test_exactness_check() -> None:
    # No busy-waits, and the GPU was idle: start k ran when queued; layer i's end was queued
    # 50 us after its start. Each interval then holds host time: none is exact.
    before, after, starts = [0.0, 1e-4, 2e-4], [5e-5, 1.5e-4, 2.5e-4], [0.0, 1e-4, 2e-4]
    assert exact_layers(before, after, starts, latency_s=0.0) == [False] * 3
    # A 1 ms busy-wait before layer 0 puts the GPU 1 ms behind: all queued in time.
    sleeps = [1e-3, 0.0, 0.0]
    shifted = [0.0, 1e-4, 2e-4]  # kernels take no time; starts relative to the first one
    assert exact_layers(before, after, shifted, sleeps, latency_s=0.0) == [True] * 3
    # ... unless the host was preempted inside layer 1 past the GPU's lead (end at 1.5 ms).
    late = [5e-5, 1.5e-3, 1.55e-3]
    assert exact_layers(before, late, shifted, sleeps, latency_s=0.0) == [True, False, False]
    # A later start queued late moves the bound too: start 2 was queued at 3 ms.
    assert exact_layers([0.0, 1e-4, 3e-3], [2e-3, 2e-3, 3.1e-3], starts, [0.0] * 3, 0.0) == [
        True, True, False,
    ]  # fmt: skip
    assert exact_layers([], [], []) == []


class FakeGPU:
    """A device clock on the host clock: a busy-wait or an event runs once the host queued it
    and the GPU finished what came before (kernels take no time here)."""

    def __init__(self, rate: float = 1000.0) -> None:
        self.rate, self.at, self.slept = rate, 0.0, []
        gpu = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.t = None

            def record(self, stream=None) -> None:
                gpu.at = self.t = max(gpu.at, time.perf_counter())

            def elapsed_time(self, end) -> float:
                return (end.t - self.t) * 1e3

        self.Event = Event

    def sleep(self, cycles: int) -> None:
        self.slept.append(cycles)
        self.at = max(self.at, time.perf_counter()) + cycles / self.rate / 1e6

    def install(self, monkeypatch, with_sleep: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: type("S", (), {
            "synchronize": lambda self: None})())  # fmt: skip
        if with_sleep:
            monkeypatch.setattr(torch.cuda, "_sleep", self.sleep, raising=False)
            monkeypatch.setattr(prof, "cycles_per_us", lambda device: self.rate)
        else:
            monkeypatch.delattr(torch.cuda, "_sleep", raising=False)


def slow_forward(module: nn.Module, seconds: float) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        time.sleep(seconds)  # a busy host: inside the timed interval
        return inner(*args, **kwargs)

    module.forward = forward


def test_without_busy_wait_it_falls_back_to_plain_events(monkeypatch) -> None:
    gpu = FakeGPU()
    gpu.install(monkeypatch, with_sleep=False)
    assert prof.cycles_per_us(torch.device("cuda", 0)) is None
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    slow_forward(model[0], 2e-3)
    p = LayerProfiler(model, torch.device("cuda", 0))
    records = p.run(lambda: model(x))[1]
    assert p.last_pass.mode == "events" and len(records) == 5 and gpu.slept == []
    assert records[0][2] >= 2e-3  # the old behaviour: host time lands inside the interval


def test_host_ahead_keeps_host_gaps_out_and_adapts(monkeypatch) -> None:
    gpu = FakeGPU()
    gpu.install(monkeypatch)
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    slow_forward(model[0], 2e-3)  # far above the first pass's 200 us budget
    p = LayerProfiler(model, torch.device("cuda", 0))
    records = p.run(lambda: model(x))[1]
    assert p.last_pass.mode == "ahead" and gpu.slept and p.last_pass.sleep_s > 0
    assert "0" in p.last_pass.dropped and "0" not in {r[0] for r in records}
    # Its measured host time now sizes its busy-wait. A busy machine (CI) can still make one
    # pass slower than the ones before it, and that pass drops the late layer again rather
    # than report it wrong: within a few passes one has none dropped.
    clean = []
    for _ in range(10):
        records = p.run(lambda: model(x))[1]
        # Kernels take no time on the fake GPU: an exact interval is (nearly) empty, and
        # what is reported is exact whether or not something was dropped.
        assert all(r[2] < 1e-3 for r in records), records
        if not p.last_pass.dropped:
            clean.append(len(records))
    assert clean and all(n == 5 for n in clean)


# ------------------------------------------------------------ on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_profiled_times_match_the_layer_bench_on_a_busy_host(backend: str) -> None:
    from bench import layer_times
    from service.engine.build import prepare_model

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = magnitude_prune(randomize_batchnorm(torchvision.models.resnet18().eval()), 0.9)
    prepared = prepare_model(model, (3, 224, 224))
    cuda = torch.device("cuda")
    runner = layer_times.build_runner(prepared, "r18", backend, cuda, "fp32", 32)
    x = torch.randn(32, 3, 224, 224, device=cuda)
    reference = {r["layer"]: r for r in layer_times.layer_times(runner, x)}
    graph_s = sum(r["seconds"] for r in reference.values())

    p = LayerProfiler(runner.module, cuda)
    for _name, module in p.layers:
        slow_forward(module, 1e-3)  # ~1 ms of host time inside every layer: a busy server
    samples: dict[str, list[float]] = {}
    with runner.context():
        for _ in range(8):
            for layer, _op, seconds in p.run(lambda: runner.forward(x))[1]:
                samples.setdefault(layer, []).append(seconds)
    assert p.last_pass.mode == "ahead"
    print(f"\n{backend}: sum of bench layer times {graph_s * 1e3:.3f} ms; last pass "
          f"{p.last_pass.host_s * 1e3:.1f} ms host, {p.last_pass.sleep_s * 1e3:.1f} ms sleep")  # fmt: skip
    bad = []
    for layer, ref in reference.items():
        if not ref["op"].startswith("conv"):
            continue
        got = samples.get(layer, [])
        med = statistics.median(got) if got else float("nan")
        ratio = med / ref["seconds"]
        print(f"  {layer:<24} bench {ref['seconds'] * 1e6:8.1f} us  profiled {med * 1e6:8.1f} us"
              f"  x{ratio:.2f}  ({len(got)} samples)")  # fmt: skip
        # Eager kernels of one layer start a few us apart where a graph replay packs them:
        # layers of a few tens of us get that much absolute slack on top of the 25%.
        if len(got) < 4 or abs(med - ref["seconds"]) > max(0.25 * ref["seconds"], 10e-6):
            bad.append((layer, len(got), round(ratio, 2)))
    assert not bad, bad
