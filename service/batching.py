"""The dynamic batcher: one BatchQueue per (model, backend).

Requests put their images in a bounded queue, one pending item (with an asyncio future) per
image. A single background task takes up to `max_batch_size` live items, waiting at most
`max_batch_delay_ms` counted from the oldest one, and runs the engine in a worker thread of
its own so that the event loop keeps accepting and preprocessing. Items whose deadline passed
or whose caller went away are dropped before they take a place in a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.admission import Backlog, admit, overloaded
from service.errors import (
    DeadlineExceededError,
    EngineFailureError,
    OverloadedError,
    QueueFullError,
    ServiceError,
    ShuttingDownError,
)
from service.metrics import ServiceMetrics

log = logging.getLogger("escort.batching")

# Runs one batch: (model, backend, rows [3,H,W] each) -> probabilities [N, classes]
# (Engine.infer_rows: rows are handed over as they are, so the engine copies each once).
InferFn = Callable[[str, str, Sequence[np.ndarray]], np.ndarray]
# Or in two steps (Engine.launch_rows, Engine.collect), so that the next batch is staged while
# one runs: launch returns a handle at once, collect waits for that batch's answer.
LaunchFn = Callable[[str, str, Sequence[np.ndarray]], Any]
CollectFn = Callable[[str, str, Any], np.ndarray]
PIPELINE_DEPTH = 2  # batches in flight at once: one on the device, the next one staging
# With a batch on the device, the next one (full or not) launches this long before that batch
# should finish (its expected time: a running mean of the batches' own times), so that its
# launch and its copies overlap the replay instead of leaving the device idle between batches.
LOOKAHEAD_S = 0.002
COMPUTE_EMA = 0.2  # weight of the newest batch in that running mean
# A row is computed only if its batch, at the mean batch time plus this fraction, ends before
# the row's deadline: the mean is a mean, and the answer still has to travel back.
FINISH_SLACK = 0.25


@dataclass
class Timeline:
    """When a request's rows moved through the batcher (time.monotonic(), one clock for every
    process of a host; for rows that went in several batches, the last one's). A caller that
    passes one to `submit` gets it filled; `service.api.state` turns it into stages."""

    enqueued: float = 0.0
    taken: float = 0.0  # its batch left the queue
    began: float = 0.0  # its batch had the device (a batch launched early waits for the last)
    finished: float = 0.0  # its batch's answers were back on the host

    def times(self) -> tuple[float, float, float, float]:
        return (self.enqueued, self.taken, self.began, self.finished)

    def update(self, times: tuple[float, float, float, float]) -> None:
        """Take the times another process measured (they travel as `times()`)."""
        self.enqueued, self.taken, self.began, self.finished = times


@dataclass(eq=False)
class _Pending:
    row: np.ndarray | None
    future: asyncio.Future[np.ndarray]
    deadline: float
    enqueued_at: float = field(default_factory=time.monotonic)
    queued: bool = True  # still in the queue and still wanted (see BatchQueue._abandon)
    taken_at: float = 0.0
    began_at: float = 0.0
    finished_at: float = 0.0


class BatchQueue:
    """Collects single images from many requests into engine batches for one model+backend."""

    def __init__(
        self,
        model: str,
        backend: str,
        infer: InferFn,
        metrics: ServiceMetrics,
        max_batch_size: int,
        max_batch_delay_ms: float,
        max_queue_size: int,
        retry_after_s: int = 1,
        launch: LaunchFn | None = None,
        collect: CollectFn | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self._infer = infer
        # With launch/collect, a full next batch is launched while one is still on the device.
        self._launch = launch
        self._collect = collect
        self._pipelined = launch is not None and collect is not None
        self._inflight: set[asyncio.Task[None]] = set()
        self._last_done = 0.0  # when the latest batch finished (monotonic)
        self._mean_compute_s: float | None = None  # running mean of a batch's own time
        self._expected_done = 0.0  # when the latest launched batch should finish (monotonic)
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self._delay_s = max_batch_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._retry_after_s = retry_after_s
        # Label lookups take a lock; resolve the children once.
        self._depth = metrics.queue_depth.labels(model)
        self._waited = metrics.queue_duration.labels(model)
        self._items: deque[_Pending] = deque()
        # Rows in `_items` still wanted. Rows whose caller left (a disconnect, its deadline)
        # stop counting at once, so they never hold room a live request needs; they are
        # skipped when reached, or swept out when they are many (see _abandon).
        self._live = 0
        self._dead = 0
        self._arrived = asyncio.Event()
        self._filled = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        # The engine is not re-entrant per (model, backend): exactly one worker thread.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{model}")
        # Collects waits for the device in a thread of its own, so the engine thread is free
        # to launch the next batch meanwhile.
        self._collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"collect-{model}")
        # Running totals for the V2 statistics endpoint.
        self.batches_run = 0
        self.images_run = 0
        self.queue_ns = 0
        self.compute_ns = 0

    @property
    def depth(self) -> int:
        """Images waiting, not counting a batch being computed nor rows nobody waits for."""
        return self._live

    def backlog(self) -> Backlog:
        """When what is queued now should be computed, from the measured batch time (before
        any batch ran: nothing to wait for)."""
        batch_s = self._mean_compute_s or 0.0
        ahead = self._device_free_at(time.monotonic())
        return Backlog(ahead + self._live / self.max_batch_size * batch_s, batch_s,
                       self.max_batch_size)  # fmt: skip

    def _device_free_at(self, now: float) -> float:
        """When the batch on the device should be done (now, with none there)."""
        return max(now, self._expected_done) if self._busy() else now

    async def in_engine_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the thread that runs this queue's batches (engine warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.model}-{self.backend}"
            )

    async def submit(
        self, batch: Sequence[np.ndarray], deadline: float, timeline: Timeline | None = None
    ) -> np.ndarray:
        """Queue the rows of `batch` (an [N, 3, H, W] array or a list of rows), wait for all of them, and return their results in order.

        Raises QueueFullError when the rows do not fit, DeadlineExceededError once `deadline`
        (a time.monotonic() value) passes, and the batch's error if the engine fails.
        """
        if self._closed:
            raise ShuttingDownError("the server is shutting down", self._retry_after_s)
        rows = len(batch)
        if self._live + rows > self.max_queue_size:
            self._metrics.rejected.labels(self.model, "queue_full").inc()
            raise QueueFullError(
                f"model {self.model!r} ({self.backend}) has {self._live} images queued "
                f"and holds at most {self.max_queue_size}; retry later",
                self._retry_after_s,
            )
        self.admit(rows, deadline)
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        pending = [_Pending(row, loop.create_future(), deadline, now) for row in batch]
        self._items.extend(pending)
        self._live += rows
        self._depth.inc(rows)
        self._idle.clear()
        self._arrived.set()
        if self._live >= self.max_batch_size:
            self._filled.set()
        futures = [item.future for item in pending]
        try:
            async with asyncio.timeout_at(loop_time(loop, deadline)):
                results = await asyncio.gather(*futures)
        except TimeoutError:
            self._abandon(pending)
            self._metrics.rejected.labels(self.model, "deadline").inc()
            raise DeadlineExceededError(
                "the request's deadline passed before it was computed; retry, raise the V2 "
                "`timeout` parameter or ESCORT_REQUEST_TIMEOUT_S"
            ) from None
        except DeadlineExceededError:
            self._abandon(pending)
            self._metrics.rejected.labels(self.model, "deadline").inc()
            raise
        except OverloadedError:  # shed when reached: it could not be back before its deadline
            self._abandon(pending)
            self._metrics.rejected.labels(self.model, "overloaded").inc()
            raise
        except asyncio.CancelledError:
            # The caller went away (client disconnect): its queued rows must not be computed.
            self._abandon(pending)
            self._metrics.rejected.labels(self.model, "client_disconnected").inc()
            raise
        except BaseException:
            self._abandon(pending)
            raise
        if timeline is not None:
            timeline.enqueued = now
            timeline.taken = max(item.taken_at for item in pending)
            timeline.began = max(item.began_at for item in pending)
            timeline.finished = max(item.finished_at for item in pending)
        return np.stack(results)

    def admit(self, rows: int, deadline: float) -> None:
        """Refuse `rows` (OverloadedError, 429) when the queue ahead of them would take them past
        `deadline`: computing them would only waste a batch on an answer nobody reads."""
        admit(self.backlog(), self.model, self.backend, rows, deadline, self._retry_after_s,
              self._metrics.rejected)  # fmt: skip

    def _abandon(self, pending: list[_Pending]) -> None:
        """The caller stopped waiting: its queued rows stop counting now (the queue's room,
        the depth gauge) and let go of their pixels; the batcher skips them when reached."""
        for item in pending:
            if item.queued:
                item.queued = False
                item.row = None
                self._live -= 1
                self._dead += 1
                self._depth.dec()
            if not item.future.done():
                item.future.cancel()
            elif not item.future.cancelled():
                item.future.exception()  # mark retrieved so asyncio does not log it
        self._drop_dead_head()
        if self._dead > 64 and self._dead > self._live:  # sweep: a deque has no cheap remove
            self._items = deque(item for item in self._items if item.queued)
            self._dead = 0
        if not self._live and not self._busy():
            self._idle.set()

    def _drop_dead_head(self) -> None:
        while self._items and not self._items[0].queued:
            self._items.popleft()
            self._dead -= 1

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        now = time.monotonic()
        # A row that cannot be back before its deadline is not computed: its batch time would
        # be spent on an answer nobody reads. Its deadline has not passed yet, so it is shed
        # as overload (429, retry), like a request refused at admission.
        begins = self._device_free_at(now)
        batch_s = self._mean_compute_s or 0.0
        finish = begins + batch_s * (1.0 + FINISH_SLACK)
        while self._items and len(batch) < self.max_batch_size:
            item = self._items.popleft()
            if not item.queued:  # abandoned: already uncounted
                self._dead -= 1
                continue
            item.queued = False
            self._live -= 1
            self._depth.dec()
            if item.future.done():
                continue
            if item.deadline <= now:
                item.future.set_exception(
                    DeadlineExceededError("the request's deadline passed while it was queued")
                )
                continue
            if item.deadline <= finish:
                backlog = Backlog(begins, batch_s, self.max_batch_size)
                item.future.set_exception(
                    overloaded(self.model, self.backend, backlog, 1, item.deadline,
                               self._retry_after_s)
                )  # fmt: skip
                continue
            item.taken_at = now
            self._waited.observe(now - item.enqueued_at)
            self.queue_ns += int((now - item.enqueued_at) * 1e9)
            batch.append(item)
        self._drop_dead_head()  # so that the head's age is a live row's
        return batch

    async def _wait_to_fill(self) -> None:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        if self._live >= self.max_batch_size or self._delay_s <= 0:
            return
        remaining = self._items[0].enqueued_at + self._delay_s - time.monotonic()
        if remaining <= 0:
            return
        self._filled.clear()
        if self._live >= self.max_batch_size:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._filled.wait()

    async def _wait_for_next(self) -> None:
        """Wait until the next batch should start. With a batch in flight (pipelined), a full
        batch starts at once and any other LOOKAHEAD_S before the one in flight should finish,
        so that its launch and copies overlap that batch's replay; otherwise wait for the
        device to finish, then the usual rule (full, or the oldest waited the delay)."""
        while self._busy() and self._live < self.max_batch_size:
            ahead = self._launch_ahead_at()
            if self._items and ahead is not None and ahead <= time.monotonic():
                return  # the device frees up within the lookahead: launch what is queued
            self._filled.clear()
            waiters = {asyncio.ensure_future(self._filled.wait())}
            if not self._items:
                self._arrived.clear()
                waiters.add(asyncio.ensure_future(self._arrived.wait()))
            timeout = None
            if self._items and ahead is not None:
                timeout = max(0.0, ahead - time.monotonic())
            await asyncio.wait(
                {*waiters, *self._busy()}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()
        if not self._busy():
            if not self._items:
                self._idle.set()
            await self._wait_to_fill()

    def _launch_ahead_at(self) -> float | None:
        """When the next batch may launch while one is in flight (None: nothing measured yet)."""
        if self._mean_compute_s is None:
            return None
        return self._expected_done - LOOKAHEAD_S

    def _busy(self) -> set[asyncio.Task[None]]:
        return {task for task in self._inflight if not task.done()}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_next()
            batch = self._take_batch()
            if not batch:
                if not self._items and not self._busy():
                    self._idle.set()
                continue
            if self._mean_compute_s is not None:
                begins = max(time.monotonic(), self._expected_done)
                self._expected_done = begins + self._mean_compute_s
            task = loop.create_task(self._compute(loop, batch))
            self._inflight = self._busy() | {task}
            depth = PIPELINE_DEPTH if self._pipelined else 1
            while len(self._busy()) >= depth:
                await asyncio.wait(self._busy(), return_when=asyncio.FIRST_COMPLETED)
            if not self._items and not self._busy():
                self._idle.set()

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        size = len(batch)
        rows = [item.row for item in batch]
        start = time.monotonic()
        try:
            if self._pipelined:
                assert self._launch is not None and self._collect is not None
                launched = await loop.run_in_executor(
                    self._worker, self._launch, self.model, self.backend, rows
                )
                outputs = await loop.run_in_executor(
                    self._collector, self._collect, self.model, self.backend, launched
                )
            else:
                outputs = await loop.run_in_executor(
                    self._worker, self._infer, self.model, self.backend, rows
                )
            outputs = np.asarray(outputs)
            if outputs.ndim < 1 or outputs.shape[0] != size:
                got = outputs.shape[0] if outputs.ndim else "no"
                raise EngineFailureError(
                    f"the engine returned {got} results for a batch of {size} on "
                    f"{self.model}/{self.backend}"
                )
        except asyncio.CancelledError:
            # Closed while the batch ran (the drain timed out): answer, do not leave it hanging.
            error = ShuttingDownError("the server shut down before this request ran", 0)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            raise
        except Exception as exc:
            self._metrics.batch_failures.labels(self.model, self.backend).inc()
            if not isinstance(exc, ServiceError):
                log.exception("batch of %d failed on %s/%s", size, self.model, self.backend)
                exc = EngineFailureError(
                    f"inference failed on {self.model}/{self.backend}: {type(exc).__name__}: {exc}"
                )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            # The batch's own time: from its launch, or, when it was launched while the one
            # before it still ran, from when that one finished.
            finished = time.monotonic()
            began = max(start, min(self._last_done, finished))
            elapsed = finished - began
            self._last_done = finished
        self.batches_run += 1
        self.images_run += size
        self.compute_ns += int(elapsed * 1e9)
        previous = self._mean_compute_s
        self._mean_compute_s = (
            elapsed if previous is None else previous + COMPUTE_EMA * (elapsed - previous)
        )
        self._metrics.compute_duration.labels(self.model, self.backend).observe(elapsed)
        if self._pipelined:
            # How long this batch, launched early, waited for the one before it to finish:
            # queued on the device, so neither in the queue time nor in the batch's own time.
            self._metrics.observe_stage(self.model, self.backend, "wait", began - start)
        self._metrics.batch_size.labels(self.model, self.backend).observe(size)
        for item, output in zip(batch, outputs, strict=True):
            item.began_at, item.finished_at = began, finished
            if not item.future.done():
                item.future.set_result(output)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued image is computed; False when `timeout_s` ran out first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop taking work, fail what is still queued, and stop the worker."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in self._busy():  # their requests get 503 (see _compute)
            task.cancel()
        error = ShuttingDownError("the server shut down before this request ran", 0)
        while self._items:
            item = self._items.popleft()
            if item.queued:
                item.queued = False
                self._live -= 1
                self._depth.dec()
            if not item.future.done():
                item.future.set_exception(error)
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._collector.shutdown(wait=False, cancel_futures=True)


def loop_time(loop: asyncio.AbstractEventLoop, deadline: float) -> float:
    """A time.monotonic() deadline on the loop's clock (the same clock on CPython, but do not
    rely on it)."""
    return loop.time() + (deadline - time.monotonic())
