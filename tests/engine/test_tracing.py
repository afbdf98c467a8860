"""The guard between torch.fx tracing and batches: a model loaded while others serve."""

from __future__ import annotations

import threading
import time

import numpy as np

from service.engine.engine import TorchEngine
from service.engine.protocol import EngineSpec
from service.engine.tracing import TraceGuard
from tests.engine.test_engine import _source


def test_a_trace_waits_for_running_batches_and_new_ones_wait_for_it() -> None:
    guard, events = TraceGuard(), []
    inside = threading.Event()

    def batch(name: str, hold_s: float) -> None:
        with guard.running():
            events.append(f"{name} in")
            inside.set()
            time.sleep(hold_s)
            events.append(f"{name} out")

    def trace() -> None:
        with guard.tracing():
            events.append("trace")

    first = threading.Thread(target=batch, args=("a", 0.3))
    first.start()
    inside.wait(5)
    tracer = threading.Thread(target=trace)
    tracer.start()
    time.sleep(0.05)  # the trace is waiting for "a" now
    second = threading.Thread(target=batch, args=("b", 0.0))
    second.start()
    for thread in (first, tracer, second):
        thread.join(5)
    # "b" arrived while the trace waited: it runs after the trace, not beside "a".
    assert events == ["a in", "a out", "trace", "b in", "b out"]


def test_loading_models_while_batches_run_fails_no_batch(tmp_path, stand_in_plan) -> None:
    spec = EngineSpec(models=("tiny-resnet",), backends=("dense",), device="cpu",
                      max_batch_size=2, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    engine = TorchEngine(spec, [_source()], progress=False, plan_factory=stand_in_plan,
                         load=lambda name, models_dir, progress: _source(name))  # fmt: skip
    batch = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    failures: list[BaseException] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                engine.infer("tiny-resnet", "dense", batch)
            except BaseException as exc:  # noqa: BLE001 - the test reports them
                failures.append(exc)

    servers = [threading.Thread(target=serve) for _ in range(2)]
    for thread in servers:
        thread.start()
    try:
        for i in range(3):
            engine.load_model(f"tiny-{i}")
    finally:
        done.set()
        for thread in servers:
            thread.join(30)
        engine.close()
    assert failures == []
