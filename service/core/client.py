"""RemoteDispatcher: an HTTP worker's Dispatcher, the engine core process at the other end.

`submit` writes the rows into free slots of this worker's SlotArena (the one copy a row takes
on this side) and sends a small "infer" message; the engine process answers "done" once the
probabilities are in the same slots, or "error". The pipe is read on the event loop
(`add_reader`), so no thread is involved. A slot is freed only on the engine's answer, never
on a timeout or a disconnect, because until then the engine may still be reading it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from service.admission import Backlog, admit
from service.batching import Timeline, loop_time
from service.config import Settings
from service.core.arena import SlotArena
from service.core.messages import rebuild_error
from service.dispatch import BatchTotals, Dispatcher, freeze_heap
from service.engine.protocol import ModelDescription
from service.errors import (
    DeadlineExceededError,
    NotReadyError,
    QueueFullError,
    UnavailableError,
)
from service.metrics import ServiceMetrics

log = logging.getLogger("escort.worker")

# How long past a request's deadline a worker waits for the engine before it gives up on it
# (the engine enforces the deadline itself; this only guards against a wedged engine).
ENGINE_GRACE_S = 5.0


@dataclass(eq=False)
class _Call:
    future: asyncio.Future[Any]
    slots: list[int]
    timeline: Timeline | None = None
    queue: tuple[str, str] | None = None  # (model, backend) of an infer


class RemoteDispatcher(Dispatcher):
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        conn: Connection,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._conn = conn
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._arena: SlotArena | None = None
        self._ready: asyncio.Future[dict[str, ModelDescription]] | None = None
        # The served models as the engine last told them: the "ready" message, then each news.
        self._latest: dict[str, ModelDescription] = {}
        self._alive = True
        self._loop: asyncio.AbstractEventLoop | None = None
        # The engine's latest word on each batcher's backlog (it comes with every answer).
        self._backlogs: dict[tuple[str, str], Backlog] = {}

    async def start(self) -> dict[str, ModelDescription]:
        loop = self._loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        loop.add_reader(self._conn.fileno(), self._on_readable)
        # uvloop (libuv's uv_poll_init) makes a polled fd non-blocking; Connection.recv then
        # fails with EAGAIN halfway through a message larger than one socket read. Messages
        # are written whole by the other side, so a blocking read of one is short.
        os.set_blocking(self._conn.fileno(), True)
        await self._ready
        # Not the "ready" snapshot itself: news read in the same burst (a load that came while
        # this worker was still starting, already confirmed as seen) supersedes it.
        models = self._latest
        in_bytes = max(int(np.prod(d.input_shape)) * 4 for d in models.values())
        out_bytes = max(d.num_classes for d in models.values()) * 4
        self._arena = SlotArena.create(self.settings.worker_slots, in_bytes, out_bytes)
        self._send(("hello", self._arena.name, self._arena.slots, in_bytes, out_bytes))
        freeze_heap()  # an HTTP worker process: everything loaded so far lives as long as it
        return models

    async def submit(
        self,
        model: str,
        backend: str,
        rows: Sequence[np.ndarray],
        deadline: float,
        timeline: Timeline | None = None,
    ) -> np.ndarray:
        arena = self._arena
        if arena is None or not self._alive:
            raise UnavailableError("the engine process is not running", 1)
        slots = arena.reserve(len(rows))
        if slots is None:
            self.metrics.rejected.labels(model, "queue_full").inc()
            raise QueueFullError(
                f"this server worker has {arena.slots - arena.free} of its {arena.slots} "
                "images in flight (ESCORT_WORKER_SLOTS); retry later",
                self.settings.retry_after_s,
            )
        try:
            arena.write_rows(slots, rows)
        except BaseException:
            arena.release(slots)
            raise
        assert self._loop is not None
        request_id = next(self._ids)
        call = _Call(self._loop.create_future(), slots, timeline, (model, backend))
        # Answers to calls nobody awaits any more (timed out, cancelled) are still consumed.
        call.future.add_done_callback(_retrieve)
        self._calls[request_id] = call
        dtype = np.dtype(rows[0].dtype).str
        # Encoded photos (1-D, ESCORT_IMAGE_DECODE=engine) vary in length; tensors do not.
        lengths = [len(row) for row in rows] if rows[0].ndim == 1 else None
        self._send(("infer", request_id, model, backend, slots, dtype, deadline, lengths))
        try:
            async with asyncio.timeout_at(loop_time(self._loop, deadline + ENGINE_GRACE_S)):
                return await asyncio.shield(call.future)
        except TimeoutError:
            self._send(("cancel", request_id))
            raise DeadlineExceededError(
                "the engine did not answer before the request's deadline"
            ) from None
        except asyncio.CancelledError:
            self._send(("cancel", request_id))  # the client went away: drop its rows
            raise

    def admit(self, model: str, backend: str, rows: int, deadline: float) -> None:
        """Refuse from the engine's last reported backlog, before any image is decoded. The
        engine checks again on arrival; this only spares the work when it would refuse."""
        backlog = self._backlogs.get((model, backend))
        if backlog is None:
            return
        admit(backlog, model, backend, rows, deadline, self.settings.retry_after_s,
              self.metrics.rejected)  # fmt: skip
        # Until the next report, count what this worker just admitted into the backlog, so
        # that a burst between two answers is not all admitted on one stale estimate.
        self._backlogs[(model, backend)] = backlog.after(rows, time.monotonic())

    def row_capacity(self) -> int | None:
        return self._arena.in_bytes if self._arena is not None else 0

    async def totals(self, model: str) -> BatchTotals:
        if not self._alive or self._loop is None:
            return BatchTotals()
        request_id = next(self._ids)
        call = _Call(self._loop.create_future(), [])
        self._calls[request_id] = call
        self._send(("totals", request_id, model))
        async with asyncio.timeout(5.0):
            return await call.future

    async def load(self, name: str) -> dict[str, ModelDescription]:
        return await self._repository_call("load", name)

    async def unload(self, name: str) -> dict[str, ModelDescription]:
        return await self._repository_call("unload", name)

    async def _repository_call(self, kind: str, name: str) -> dict[str, ModelDescription]:
        if not self._alive or self._loop is None:
            raise UnavailableError("the engine process is not running", 1)
        request_id = next(self._ids)
        call = _Call(self._loop.create_future(), [])
        call.future.add_done_callback(_retrieve)
        self._calls[request_id] = call
        self._send((kind, request_id, name))
        # No time limit: a load builds and tunes (minutes on a GPU); the client's own
        # timeout ends its wait, never the engine's work.
        return await asyncio.shield(call.future)

    async def close(self) -> None:
        self._lost(UnavailableError("the server shut down before this request ran", 0))
        if self._arena is not None:
            self._arena.close(unlink=True)
            self._arena = None

    # -- the pipe ---------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except OSError:
            self._lost(UnavailableError("the engine process is gone", 1))

    def _on_readable(self) -> None:
        try:
            while self._alive and self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError) as exc:
            log.warning("lost the engine process: %r", exc)
            self._lost(UnavailableError("the engine process stopped", 1))
            if self._on_lost is not None:
                self._on_lost()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready" and self._ready is not None and not self._ready.done():
            self._latest = message[1]
            self._ready.set_result(message[1])
            return
        if kind == "models" and message[1] == 0:  # the engine's news: the served models changed
            self._latest = message[2]
            if self.on_models is not None:
                self.on_models(message[2])
            self._send(("seen", message[3]))  # the load or unload answers once all have it
            return
        if kind == "failed" and self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                NotReadyError(f"the engine process could not load the models: {message[1]}")
            )
            return
        call = self._calls.pop(message[1], None)
        if call is None:
            return
        if call.queue is not None and isinstance(message[-1], Backlog):
            self._backlogs[call.queue] = message[-1]
        if call.slots and self._arena is not None:
            if kind == "done":
                result: Any = self._arena.read_outputs(call.slots, message[2])
                if call.timeline is not None:
                    call.timeline.update(message[3])
            self._arena.release(call.slots)
        if call.future.done():
            return
        if kind == "done":
            call.future.set_result(result)
        elif kind in ("totals", "models"):
            call.future.set_result(message[2])
        elif kind == "error":
            call.future.set_exception(rebuild_error(*message[2:5]))

    def _lost(self, error: Exception) -> None:
        """Fail every open call; the engine will answer none of them."""
        if not self._alive:
            return
        self._alive = False
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(error)
        self._calls.clear()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
