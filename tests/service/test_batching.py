"""The batcher on its own: batches form, deadlines and cancellations drop work before it
runs, a full queue refuses, and a failed batch fails each of its requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

from service import batching
from service.batching import BatchQueue
from service.errors import (
    DeadlineExceededError,
    EngineFailureError,
    OverloadedError,
    QueueFullError,
    ShuttingDownError,
)
from service.metrics import ServiceMetrics
from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor


def make_queue(engine: FakeEngine, **overrides) -> tuple[BatchQueue, ServiceMetrics]:
    metrics = ServiceMetrics(max_batch_size=overrides.get("max_batch_size", 8))
    options = {"max_batch_size": 8, "max_batch_delay_ms": 20.0, "max_queue_size": 64}
    options.update(overrides)
    queue = BatchQueue(FAKE_MODEL, "sparse", engine.infer_rows, metrics, **options)
    return queue, metrics


def sample(metrics: ServiceMetrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def later(seconds: float) -> float:
    return time.monotonic() + seconds


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    engine = FakeEngine()

    async def scenario() -> None:
        queue, metrics = make_queue(engine)
        queue.start()
        tensors = [marked_tensor(i / 10, rows=1 + i % 2) for i in range(12)]
        results = await asyncio.gather(*(queue.submit(t, later(5)) for t in tensors))
        for tensor, result in zip(tensors, results, strict=True):
            np.testing.assert_allclose(result, engine.reference(tensor), rtol=1e-6)
        sizes = [size for _, _, size in engine.calls]
        assert sum(sizes) == sum(len(t) for t in tensors) == 18
        assert max(sizes) == 8 and len(sizes) <= 4  # they really were batched
        labels = {"model": FAKE_MODEL, "backend": "sparse"}
        assert sample(metrics, "escort_batch_size_count", labels) == len(sizes)
        assert sample(metrics, "escort_batch_size_sum", labels) == 18
        assert sample(metrics, "escort_queue_depth", {"model": FAKE_MODEL}) == 0
        await queue.close()

    asyncio.run(scenario())


def test_a_lone_request_waits_at_most_the_delay() -> None:
    engine = FakeEngine()

    async def scenario() -> None:
        queue, _ = make_queue(engine, max_batch_delay_ms=50.0)
        queue.start()
        start = time.monotonic()
        await queue.submit(marked_tensor(1.0), later(5))
        elapsed = time.monotonic() - start
        assert 0.04 <= elapsed < 1.0
        await queue.close()

    asyncio.run(scenario())


def test_queue_full_refuses_whole_requests() -> None:
    engine = FakeEngine(gate=threading.Event())

    async def scenario() -> None:
        queue, metrics = make_queue(engine, max_batch_size=2, max_queue_size=4)
        queue.start()
        first = asyncio.ensure_future(queue.submit(marked_tensor(0.0, rows=2), later(10)))
        while not engine.started.is_set():  # the engine holds the first batch
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(queue.submit(marked_tensor(1.0, rows=3), later(10)))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError) as err:
            await queue.submit(marked_tensor(2.0, rows=2), later(10))
        assert err.value.status_code == 503 and err.value.headers["Retry-After"] == "1"
        assert (
            sample(metrics, "escort_rejected_total", {"model": FAKE_MODEL, "reason": "queue_full"})
            == 1
        )
        assert queue.depth == 3
        engine.gate.set()
        assert len(await first) == 2 and len(await waiting) == 3
        await queue.close()

    asyncio.run(scenario())


def test_expired_requests_are_never_computed() -> None:
    engine = FakeEngine(gate=threading.Event())

    async def scenario() -> None:
        queue, metrics = make_queue(engine, max_batch_size=1)
        queue.start()
        blocker = asyncio.ensure_future(queue.submit(marked_tensor(0.0), later(10)))
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceededError):
            await queue.submit(marked_tensor(7.0), later(0.1))
        engine.gate.set()
        await blocker
        await queue.submit(marked_tensor(8.0), later(5))
        assert 7.0 not in engine.rows_seen and 8.0 in engine.rows_seen
        assert (
            sample(metrics, "escort_rejected_total", {"model": FAKE_MODEL, "reason": "deadline"})
            == 1
        )
        await queue.close()

    asyncio.run(scenario())


def test_cancelled_requests_are_dropped_before_batching() -> None:
    engine = FakeEngine(gate=threading.Event())

    async def scenario() -> None:
        queue, metrics = make_queue(engine, max_batch_size=4)
        queue.start()
        blocker = asyncio.ensure_future(queue.submit(marked_tensor(0.0), later(10)))
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(queue.submit(marked_tensor(5.0, rows=2), later(10)))
        kept = asyncio.ensure_future(queue.submit(marked_tensor(6.0), later(10)))
        await asyncio.sleep(0.05)
        gone.cancel()  # what a client disconnect does to its handler
        await asyncio.sleep(0.01)
        engine.gate.set()
        await blocker
        await kept
        assert 5.0 not in engine.rows_seen and 6.0 in engine.rows_seen
        labels = {"model": FAKE_MODEL, "reason": "client_disconnected"}
        assert sample(metrics, "escort_rejected_total", labels) == 1
        await queue.close()

    asyncio.run(scenario())


def test_rows_of_cancelled_requests_free_their_room_at_once() -> None:
    engine = FakeEngine(gate=threading.Event())

    async def scenario() -> None:
        queue, metrics = make_queue(engine, max_batch_size=1, max_queue_size=4)
        queue.start()
        blocker = asyncio.ensure_future(queue.submit(marked_tensor(0.0), later(10)))
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        gone = [
            asyncio.ensure_future(queue.submit(marked_tensor(5.0), later(10))) for _ in range(4)
        ]
        await asyncio.sleep(0.02)
        assert queue.depth == 4
        for task in gone:
            task.cancel()
        await asyncio.sleep(0.01)
        # The engine is still busy, yet the room and the gauge are free again.
        assert queue.depth == 0
        assert sample(metrics, "escort_queue_depth", {"model": FAKE_MODEL}) == 0
        kept = asyncio.ensure_future(queue.submit(marked_tensor(6.0, rows=4), later(10)))
        await asyncio.sleep(0.01)
        engine.gate.set()
        await blocker
        await kept
        assert 5.0 not in engine.rows_seen and engine.rows_seen.count(6.0) == 4
        await queue.close()

    asyncio.run(scenario())


def test_work_the_backlog_would_finish_past_its_deadline_is_refused() -> None:
    engine = FakeEngine(delay_s=0.05)

    async def scenario() -> None:
        queue, metrics = make_queue(engine, max_batch_size=2, max_batch_delay_ms=0)
        queue.start()
        await queue.submit(marked_tensor(0.0), later(10))  # measures a batch: about 50 ms
        running = [asyncio.ensure_future(queue.submit(marked_tensor(1.0), later(10)))
                   for _ in range(8)]  # fmt: skip
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match="overloaded"):
            await queue.submit(marked_tensor(2.0), later(0.1))  # 4 batches ahead: ~200 ms
        await asyncio.gather(*running)
        assert 2.0 not in engine.rows_seen
        labels = {"model": FAKE_MODEL, "reason": "overloaded"}
        assert sample(metrics, "escort_rejected_total", labels) == 1
        await queue.close()

    asyncio.run(scenario())


def test_a_failed_batch_fails_each_request_and_the_queue_carries_on() -> None:
    engine = FakeEngine(fail=True)

    async def scenario() -> None:
        queue, metrics = make_queue(engine)
        queue.start()
        outcomes = await asyncio.gather(
            *(queue.submit(marked_tensor(i), later(5)) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, EngineFailureError) for o in outcomes)
        assert "simulated device fault" in str(outcomes[0])
        assert (
            sample(
                metrics, "escort_batch_failures_total", {"model": FAKE_MODEL, "backend": "sparse"}
            )
            >= 1
        )
        engine.fail = False
        assert len(await queue.submit(marked_tensor(1.0), later(5))) == 1
        await queue.close()

    asyncio.run(scenario())


def test_a_wrong_number_of_results_is_an_engine_failure() -> None:
    engine = FakeEngine(wrong_count=True)

    async def scenario() -> None:
        queue, _ = make_queue(engine)
        queue.start()
        with pytest.raises(EngineFailureError, match="returned 1 results for a batch of 2"):
            await queue.submit(marked_tensor(1.0, rows=2), later(5))
        await queue.close()

    asyncio.run(scenario())


def test_close_fails_what_is_still_queued() -> None:
    engine = FakeEngine(gate=threading.Event())

    async def scenario() -> None:
        queue, _ = make_queue(engine, max_batch_size=1)
        queue.start()
        blocker = asyncio.ensure_future(queue.submit(marked_tensor(0.0), later(10)))
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(queue.submit(marked_tensor(1.0), later(10)))
        await asyncio.sleep(0.02)
        assert not await queue.drain(0.05)  # still busy
        await queue.close()
        engine.gate.set()
        with pytest.raises(ShuttingDownError):
            await queued
        blocker.cancel()
        with pytest.raises(ShuttingDownError):
            await queue.submit(marked_tensor(2.0), later(1))

    asyncio.run(scenario())


class PipelinedFake:
    """launch returns at once and the 'device' works in a thread of its own, `device_s` per
    batch, one batch at a time; collect waits for it. Records when each step happened."""

    def __init__(self, engine: FakeEngine, device_s: float) -> None:
        self.engine = engine
        self.device_s = device_s
        self.device = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.events: list[tuple[str, int, float]] = []
        self.count = 0

    def launch(self, model: str, backend: str, rows) -> tuple[int, concurrent.futures.Future]:
        self.count += 1
        batch = np.stack(rows)
        self.events.append(("launch", self.count, time.monotonic()))

        def run() -> np.ndarray:
            time.sleep(self.device_s)
            return self.engine.reference(batch)

        return self.count, self.device.submit(run)

    def queue(self) -> tuple[BatchQueue, ServiceMetrics]:
        """A pipelined BatchQueue over this fake, batches of 4."""
        metrics = ServiceMetrics(max_batch_size=4)
        queue = BatchQueue(
            FAKE_MODEL, "sparse", self.engine.infer_rows, metrics, max_batch_size=4,
            max_batch_delay_ms=5.0, max_queue_size=64, launch=self.launch, collect=self.collect,
        )  # fmt: skip
        return queue, metrics

    def times(self, kind: str) -> dict[int, float]:
        """Batch number -> when it was launched or collected."""
        return {n: t for what, n, t in self.events if what == kind}

    def collect(self, model: str, backend: str, launched) -> np.ndarray:
        number, future = launched
        result = future.result()
        self.events.append(("collect", number, time.monotonic()))
        return result


def test_a_full_next_batch_launches_while_one_is_on_the_device() -> None:
    fake = PipelinedFake(FakeEngine(), device_s=0.1)

    async def scenario() -> float:
        queue, metrics = fake.queue()
        queue.start()
        tensors = [marked_tensor(i / 20) for i in range(16)]
        timelines = [batching.Timeline() for _ in tensors]
        started = time.monotonic()
        results = await asyncio.gather(
            *(queue.submit(t, later(10), line) for t, line in zip(tensors, timelines, strict=True))
        )
        for line in timelines:
            assert started <= line.enqueued <= line.taken <= line.began < line.finished
            assert line.finished - line.began >= 0.09  # its batch's own device time
        # The last batch was launched while the third ran: it waited most of a device time.
        assert timelines[-1].began - timelines[-1].taken >= 0.05
        wall = time.monotonic() - started
        for tensor, result in zip(tensors, results, strict=True):
            np.testing.assert_allclose(result, fake.engine.reference(tensor), rtol=1e-6)
        labels = {"model": FAKE_MODEL, "backend": "sparse"}
        assert sample(metrics, "escort_batch_size_count", labels) == 4
        # Each batch's own time: the sum cannot exceed the wall time although batches overlap.
        assert sample(metrics, "escort_compute_duration_seconds_sum", labels) <= wall + 0.01
        # Batches 2-4 each waited most of a device time for the one before them: the "wait"
        # stage, which neither the queue time nor the batch's own time holds.
        wait = {**labels, "stage": "wait"}
        assert sample(metrics, "escort_stage_duration_seconds_count", wait) == 4
        waited = sample(metrics, "escort_stage_duration_seconds_sum", wait)
        assert 3 * 0.05 < waited < wall
        assert await queue.drain(1.0)
        await queue.close()
        return wall

    wall = asyncio.run(scenario())
    launches, collects = fake.times("launch"), fake.times("collect")
    assert sorted(launches) == sorted(collects) == [1, 2, 3, 4]
    # Full batches queued behind a running one were launched before it was collected...
    assert all(launches[n + 1] < collects[n] for n in (1, 2, 3))
    # ...but never more than two in flight.
    assert all(launches[n + 2] >= collects[n] for n in (1, 2))
    assert wall < 4 * 0.1 + 0.3


def test_before_any_batch_was_timed_a_partial_batch_waits_for_the_device() -> None:
    fake = PipelinedFake(FakeEngine(), device_s=0.1)

    async def scenario() -> None:
        queue, metrics = fake.queue()
        queue.start()
        first = [asyncio.ensure_future(queue.submit(marked_tensor(0.1), later(10)))
                 for _ in range(4)]  # fmt: skip
        await asyncio.sleep(0.03)  # the first batch is on the device
        second = await queue.submit(marked_tensor(0.2), later(10))
        await asyncio.gather(*first)
        np.testing.assert_allclose(second, fake.engine.reference(marked_tensor(0.2)), rtol=1e-6)
        await queue.close()

    asyncio.run(scenario())
    launches, collects = fake.times("launch"), fake.times("collect")
    assert launches[2] >= collects[1]  # one row is not worth overlapping: it waited


def test_a_partial_batch_launches_just_before_the_device_frees_up(monkeypatch) -> None:
    monkeypatch.setattr(batching, "LOOKAHEAD_S", 0.02)  # wide enough for a loaded CI machine
    fake = PipelinedFake(FakeEngine(), device_s=0.1)

    async def scenario() -> None:
        queue, _ = fake.queue()
        queue.start()
        # One batch to time the device, then a full one on it, then a lone row behind it.
        await asyncio.gather(*(queue.submit(marked_tensor(0.1), later(10)) for _ in range(4)))
        full = [asyncio.ensure_future(queue.submit(marked_tensor(0.2), later(10)))
                for _ in range(4)]  # fmt: skip
        await asyncio.sleep(0.03)
        lone = await queue.submit(marked_tensor(0.3), later(10))
        await asyncio.gather(*full)
        np.testing.assert_allclose(lone, fake.engine.reference(marked_tensor(0.3)), rtol=1e-6)
        await queue.close()

    asyncio.run(scenario())
    launches, collects = fake.times("launch"), fake.times("collect")
    # The lone row neither waited for the full batch's answer nor launched at once beside it:
    # it went to the device within the lookahead of that batch's expected end.
    assert launches[3] < collects[2]
    assert launches[3] > launches[2] + 0.05
