"""The engine core process: it owns the engine (the GPU, the CUDA graphs) and the batchers.

Its event loop does nothing but move small messages: each HTTP worker's pipe is read with
`add_reader`, an "infer" becomes `LocalDispatcher.submit` on rows viewed in place in the
worker's arena, and the answer goes back as "done" once the outputs are written into the same
slots. The batches themselves run in the batchers' engine threads, so this process's GIL is
shared by one busy thread (the engine's) and a loop that is idle most of the time, unlike a
single process whose loop also parses megabytes of HTTP bodies.

It ignores SIGINT and SIGTERM: the supervisor stops it ("stop") once every worker drained,
and it stops by itself when the supervisor's pipe closes (the supervisor died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from service import logs
from service.batching import Timeline
from service.config import Settings
from service.core.arena import SlotArena
from service.core.messages import error_message
from service.dispatch import EngineFactory, LocalDispatcher, default_engine_factory, freeze_heap
from service.engine.protocol import ModelDescription
from service.errors import (
    BadInputError,
    ClientDisconnectedError,
    EngineFailureError,
    ModelNotFoundError,
)
from service.metrics import ServiceMetrics

log = logging.getLogger("escort.engine_process")

# How long a thread that wants the GIL waits for the one holding it (CPython's default: 5 ms).
# A batch crosses three threads here (loop -> engine thread -> collector -> loop), each hop
# up to one interval when another thread is busy in Python. At 64 clients on the H200 a batch
# took 0.70 ms over its replay with 0.5 ms (run 4) and 0.42 ms with 0.1 ms (run 5).
SWITCH_INTERVAL_S = 0.0001
LOAD_FAILED = 3  # exit code: the models did not load (already said in one line)


# How long a load or unload waits for every worker to take the new set of models in before it
# answers anyway (a worker that does not answer in this time is stuck or gone).
NEWS_TIMEOUT_S = 10.0


class _ModelNews:
    """The served models' changes, told to every worker. A load or unload answers its caller
    only once every live worker has taken the change in: otherwise a request sent right after
    the answer could reach (by the kernel's choice of listener) a worker that has not read the
    news from its pipe yet, and get 404 for a model that is loaded."""

    def __init__(self) -> None:
        self.links: list[_WorkerLink] = []
        self.version = 0
        self._changed = asyncio.Event()

    def announce(self, current: dict[str, ModelDescription]) -> None:
        self.version += 1
        for link in self.links:
            link.send(("models", 0, current, self.version))  # id 0: everybody's news

    def seen(self, link: _WorkerLink, version: int) -> None:
        link.news_seen = max(link.news_seen, version)
        self._changed.set()

    async def all_seen(self) -> None:
        """Until every live worker has taken in the latest change (or NEWS_TIMEOUT_S)."""
        version = self.version
        try:
            async with asyncio.timeout(NEWS_TIMEOUT_S):
                while any(not k.closed and k.news_seen < version for k in self.links):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            slow = [k.index for k in self.links if not k.closed and k.news_seen < version]
            log.warning("workers %s did not confirm the new set of models in %.0f s",
                        slow, NEWS_TIMEOUT_S)  # fmt: skip


class _WorkerLink:
    """One HTTP worker as the engine process sees it: its pipe, its arena, its requests."""

    def __init__(
        self,
        index: int,
        conn: Connection,
        dispatcher: LocalDispatcher,
        news: _ModelNews,
    ) -> None:
        self.index = index
        self.conn = conn
        self.dispatcher = dispatcher
        self.news = news
        self.news_seen = 0  # the latest version of the served models this worker confirmed
        self.arena: SlotArena | None = None
        self.pinned = False
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.closed = False

    def send(self, message: tuple[Any, ...]) -> None:
        if self.closed:
            return
        try:
            self.conn.send(message)
        except (OSError, EOFError):
            self.close()

    def on_readable(self) -> None:
        try:
            while not self.closed and self.conn.poll():
                self.handle(self.conn.recv())
        except (EOFError, OSError):
            self.close()

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "infer":
            _, request_id, model, backend, slots, dtype, deadline, lengths = message
            task = asyncio.get_running_loop().create_task(
                self._infer(request_id, model, backend, slots, dtype, deadline, lengths)
            )
            self.tasks[request_id] = task
        elif kind == "cancel":
            task = self.tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "totals":
            _, request_id, model = message
            asyncio.get_running_loop().create_task(self._totals(request_id, model))
        elif kind in ("load", "unload"):
            _, request_id, model = message
            asyncio.get_running_loop().create_task(self._repository_change(kind, request_id, model))
        elif kind == "seen":
            self.news.seen(self, message[1])
        elif kind == "hello":
            _, name, slots, in_bytes, out_bytes = message
            self.arena = SlotArena.attach(name, slots, in_bytes, out_bytes)
            engine = self.dispatcher.engine
            self.pinned = engine is not None and engine.pin_host_memory(
                self.arena.address, self.arena.size
            )
            log.info(
                "worker %d: arena of %d slots (%d MiB), %s",
                self.index,
                slots,
                self.arena.size >> 20,
                "page-locked" if self.pinned else "staged",
            )
        else:
            log.warning("worker %d sent an unknown message %r", self.index, kind)

    async def _infer(
        self,
        request_id: int,
        model: str,
        backend: str,
        slots: list[int],
        dtype: str,
        deadline: float,
        lengths: list[int] | None,
    ) -> None:
        try:
            desc = self.dispatcher.description(model)
            if desc is None:  # unloaded (and drained) since the worker admitted the request
                raise ModelNotFoundError(f"model {model!r} is not loaded")
            if self.arena is None:
                raise EngineFailureError("the worker sent rows before its arena")
            shapes = [(n,) for n in lengths] if lengths else [desc.input_shape] * len(slots)
            rows = [self.arena.row(s, dtype, shape) for s, shape in zip(slots, shapes, strict=True)]
            if self.pinned:  # their copies to the device start now, not when the batch does
                self.dispatcher.engine.prefetch_rows(rows)
            timeline = Timeline()
            outputs = await self.dispatcher.submit(model, backend, rows, deadline, timeline)
            del rows  # views into the arena: none may outlive the answer
            outputs = np.asarray(outputs, dtype=np.float32)
            classes = int(outputs.shape[1])
            for slot, row in zip(slots, outputs, strict=True):
                self.arena.output(slot, classes)[:] = row
            backlog = self.dispatcher.backlog(model, backend)
            self.send(("done", request_id, classes, timeline.times(), backlog))
        except asyncio.CancelledError:
            # The worker's client went away; the batcher dropped the rows. Answer anyway:
            # the worker frees the slots only on an answer.
            error = ClientDisconnectedError("the client disconnected before the answer")
            self.send(error_message(request_id, error))
        except Exception as exc:
            backlog = self.dispatcher.backlog(model, backend)
            self.send((*error_message(request_id, exc), backlog))
        finally:
            self.tasks.pop(request_id, None)

    async def _totals(self, request_id: int, model: str) -> None:
        self.send(("totals", request_id, await self.dispatcher.totals(model)))

    async def _repository_change(self, kind: str, request_id: int, model: str) -> None:
        """A load or unload this worker asked for. Every worker hears of the new set of models
        through the dispatcher's `on_models`, and this answer waits until each has confirmed
        it (`_ModelNews`), so that every worker serves the change when the client hears of it."""
        change = self.dispatcher.load if kind == "load" else self.dispatcher.unload
        try:
            models = await change(model)
            await self.news.all_seen()
            self.send(("models", request_id, models))
        except Exception as exc:
            self.send(error_message(request_id, exc))

    def close(self) -> None:
        """The worker is gone: drop its queued rows, then let its arena go."""
        if self.closed:
            return
        self.closed = True
        asyncio.get_running_loop().remove_reader(self.conn.fileno())
        for task in list(self.tasks.values()):
            task.cancel()
        asyncio.get_running_loop().create_task(self.release_arena())

    async def release_arena(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self.arena is not None:
            if self.pinned and self.dispatcher.engine is not None:
                self.dispatcher.engine.unpin_host_memory(self.arena.address)
            self.arena.close()
            self.arena = None


async def serve_engine(
    settings: Settings,
    control: Connection,
    conns: list[Connection],
    engine_factory: EngineFactory = default_engine_factory,
) -> int:
    """Load the engine, tell every worker, then serve them until told to stop."""
    loop = asyncio.get_running_loop()
    metrics = ServiceMetrics(settings.max_batch_size)
    dispatcher = LocalDispatcher(settings, metrics, engine_factory=engine_factory)
    stop = asyncio.Event()

    def on_control() -> None:
        try:
            message = control.recv()
        except (EOFError, OSError):
            message = ("stop",)  # the supervisor died: nobody is left to stop us
        if message[0] == "stop":
            loop.remove_reader(control.fileno())
            stop.set()

    loop.add_reader(control.fileno(), on_control)
    try:
        models = await dispatcher.start()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        # One line for a setting this machine cannot meet (ESCORT_DEVICE=cuda without a GPU);
        # a traceback only for what is a bug. The workers stay quiet about it (see _prepare).
        logs.log_failure(log, "could not load the models", exc)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(("failed", reason))
        await dispatcher.close()
        return LOAD_FAILED
    freeze_heap()
    log.debug("engine event loop: %s", type(loop).__module__.split(".")[0])
    news = _ModelNews()
    links = [_WorkerLink(i, conn, dispatcher, news) for i, conn in enumerate(conns)]
    news.links = links

    def fits(desc: ModelDescription) -> None:
        _check_fits(desc, [link.arena for link in links if link.arena is not None])

    dispatcher.on_models = news.announce
    dispatcher.check_fits = fits
    for link in links:
        link.send(("ready", models))
        loop.add_reader(link.conn.fileno(), link.on_readable)
        os.set_blocking(link.conn.fileno(), True)  # see RemoteDispatcher.start
    await stop.wait()
    await dispatcher.close()  # fails what is queued; the batchers let go of their rows
    for link in links:
        link.close()
        await link.release_arena()
    log.info("engine process stopped")
    return 0


def _check_fits(desc: ModelDescription, arenas: list[SlotArena]) -> None:
    """The workers' slots were sized at start for the largest model then served: a model
    loaded later must fit them (its photos may be any size: they go as decoded rows)."""
    in_bytes = int(np.prod(desc.input_shape)) * 4
    out_bytes = desc.num_classes * 4
    for arena in arenas:
        if in_bytes > arena.in_bytes or out_bytes > arena.out_bytes:
            raise BadInputError(
                f"model {desc.name!r} needs {in_bytes} bytes per input row and {out_bytes} per "
                f"output; the workers' slots hold {arena.in_bytes} and {arena.out_bytes} (sized "
                "at start for the models in ESCORT_MODELS): start with a model at least as large"
            )


def main(
    settings: Settings,
    control: Connection,
    conns: list[Connection],
    engine_factory: EngineFactory = default_engine_factory,
) -> None:
    """The engine process's entry point (spawned by the supervisor)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(logs.ENGINE, settings.log_level)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        code = runner.run(serve_engine(settings, control, conns, engine_factory))
    sys.exit(code)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (uvicorn[standard] brings it, and the HTTP workers
    run on it), else asyncio's. Every request crosses this loop twice, once in and once out,
    and a batch's answers leave it one after another: its cost per callback is what the last
    request of a batch waits for (the "back" stage)."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
