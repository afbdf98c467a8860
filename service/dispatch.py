"""The seam between the routes and whatever runs the models.

The routes (through `ServiceState`) depend only on a `Dispatcher`: start it, submit a batch of
preprocessed rows with a deadline, read its totals, close it. Two implementations:

- `LocalDispatcher`: the engine and its batchers in this process (the engine core process runs
  one; tests hand it a fake engine).
- `service.core.client.RemoteDispatcher`: an HTTP worker's view of the engine core process,
  rows passed through shared memory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.admission import Backlog
from service.batching import BatchQueue, Timeline
from service.config import Settings
from service.engine.errors import UnknownModelError
from service.engine.protocol import Engine, ModelDescription
from service.errors import BadInputError, ModelNotFoundError
from service.metrics import ServiceMetrics

log = logging.getLogger("escort.dispatch")

MEMORY_REFRESH_S = 2.0  # how stale escort_device_memory_bytes may be

# Builds the engine (slow: weights, tuning, CUDA graphs); runs in a thread.
EngineFactory = Callable[[Settings, ServiceMetrics], Engine]


def freeze_heap() -> None:
    """Once loaded, move every object alive into the collector's permanent generation: the
    models, torch and the app are never garbage, and a full collection that walked them all
    would stall this process's requests for tens of milliseconds (a p99 outlier). Only the
    processes of the layout do it (the engine process, the HTTP workers), once ready; a server
    run inside another program (tests, a notebook) leaves that program's collector alone."""
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class BatchTotals:
    """Running totals of one model's batchers, for the V2 statistics endpoint."""

    batches: int = 0
    images: int = 0
    queue_ns: int = 0
    compute_ns: int = 0


class Dispatcher(ABC):
    """Runs batches of preprocessed rows for the routes, whatever process the engine is in."""

    @abstractmethod
    async def start(self) -> dict[str, ModelDescription]:
        """Load (or connect to) the engine, warm it, and return the models it serves."""

    @abstractmethod
    async def submit(
        self,
        model: str,
        backend: str,
        rows: Sequence[np.ndarray],
        deadline: float,
        timeline: Timeline | None = None,
    ) -> np.ndarray:
        """Rows [3, H, W] (an [N, 3, H, W] array or a list of rows) -> probabilities
        [N, classes]. `deadline` is a time.monotonic() value (one clock for every process of
        a host). Raises the ServiceErrors of the batcher: queue full, deadline, shutdown.
        A `timeline`, when given, is filled with when the rows moved through the batcher."""

    def row_capacity(self) -> int | None:
        """The most bytes one row may take on its way to the engine (None: no limit)."""
        return None

    def admit(self, model: str, backend: str, rows: int, deadline: float) -> None:  # noqa: B027
        """Refuse (OverloadedError, 429, reason "overloaded") `rows` that the model's queue would
        compute only after `deadline`, before the caller spends anything on them (decoding
        their images, copying them over). The default admits everything."""

    @abstractmethod
    async def totals(self, model: str) -> BatchTotals:
        """Batches, images, queue and compute time of the model so far."""

    @abstractmethod
    async def close(self) -> None:
        """Fail what is queued, stop, and release the engine."""

    # The repository API: load and unload models at run time. Each answers every model served
    # afterwards; `on_models` hears of every change, whichever process asked for it.
    on_models: Callable[[dict[str, ModelDescription]], None] | None = None

    @abstractmethod
    async def load(self, name: str) -> dict[str, ModelDescription]:
        """Load a model (a manifest name) beside the served ones."""

    @abstractmethod
    async def unload(self, name: str) -> dict[str, ModelDescription]:
        """Stop serving a model once its queued requests are done."""


def default_engine_factory(settings: Settings, metrics: ServiceMetrics) -> Engine:
    """The engine `ESCORT_ENGINE` names: torch (the real one) or null (computes nothing)."""
    if settings.engine == "null":
        from service.engine.null import NullEngine

        return NullEngine(settings)
    # Imported here: the engine pulls in torch, which the rest of the service never needs.
    from service.app import engine_spec  # noqa: PLC0415 - app imports this module
    from service.engine import load_engine

    return load_engine(
        engine_spec(settings),
        layer_observer=metrics.observe_layer,
        progress=True,
        stage_observer=metrics.observe_stage,
    )


class LocalDispatcher(Dispatcher):
    """One BatchQueue per (model, backend) over an Engine in this process."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        engine: Engine | None = None,
        engine_factory: EngineFactory = default_engine_factory,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self._factory = engine_factory
        self.batchers: dict[tuple[str, str], BatchQueue] = {}
        self.models: dict[str, ModelDescription] = {}
        # Models being unloaded: no longer served to new requests, but their batchers still
        # take what a worker admitted before it heard of the unload (see unload).
        self._unloading: dict[str, ModelDescription] = {}
        self._memory_task: asyncio.Task[None] | None = None
        self._repository_lock = asyncio.Lock()  # one load or unload at a time
        # Checked before a model loads: can every HTTP worker's slots hold its rows? (The
        # engine process sets it from the arenas the workers announced.)
        self.check_fits: Callable[[ModelDescription], None] | None = None

    async def _watch_memory(self) -> None:
        assert self.engine is not None
        while True:
            try:
                self.metrics.record_memory(self.engine.memory_stats())
                self.metrics.refresh_process("engine")  # no-op unless this is the engine process
            except Exception:  # a gauge must never take the engine down
                log.debug("memory_stats failed", exc_info=True)
            await asyncio.sleep(MEMORY_REFRESH_S)

    async def start(self) -> dict[str, ModelDescription]:
        settings, metrics = self.settings, self.metrics
        started = time.monotonic()
        if self.engine is None:
            self.engine = await asyncio.to_thread(self._factory, settings, metrics)
        models = self.engine.describe()
        self._memory_task = asyncio.get_running_loop().create_task(self._watch_memory())
        for name, desc in models.items():
            await self._start_model(name, desc)
        log.info(
            "engine ready: %s in %.1f s",
            ", ".join(f"{n} ({'/'.join(d.backends)})" for n, d in models.items()),
            time.monotonic() - started,
        )
        return dict(self.models)

    async def _start_model(self, name: str, desc: ModelDescription) -> None:
        """The model's batchers, each warmed in its own engine thread, then ready."""
        settings, metrics, engine = self.settings, self.metrics, self.engine
        assert engine is not None
        metrics.prepare_model(name, desc.backends, desc.layer_sparsity)
        for backend in desc.backends:
            batcher = BatchQueue(
                name,
                backend,
                engine.infer_rows,
                metrics,
                max_batch_size=min(settings.max_batch_size, desc.max_batch_size),
                max_batch_delay_ms=settings.max_batch_delay_ms,
                max_queue_size=settings.max_queue_size,
                retry_after_s=settings.retry_after_s,
                launch=engine.launch_rows if engine.pipelined else None,
                collect=engine.collect if engine.pipelined else None,
            )
            # In the thread that will run this model's batches (see Engine.warmup).
            await batcher.in_engine_thread(engine.warmup, name, backend)
            batcher.start()
            self.batchers[(name, backend)] = batcher
        self.models[name] = desc
        metrics.model_ready.labels(name).set(1)

    def description(self, name: str) -> ModelDescription | None:
        """A model that takes rows: served, or being unloaded while its queues drain."""
        return self.models.get(name) or self._unloading.get(name)

    def _announce(self) -> None:
        if self.on_models is not None:
            self.on_models(dict(self.models))

    async def load(self, name: str) -> dict[str, ModelDescription]:
        """Load a model (a manifest name) beside the served ones; loaded already: no-op. The
        build runs in a thread of its own, so the served models' batches go on meanwhile."""
        async with self._repository_lock:
            if name in self.models:
                return dict(self.models)
            assert self.engine is not None
            started = time.monotonic()
            log.info("loading %s", name)
            try:
                desc = await asyncio.to_thread(self.engine.load_model, name)
                if self.check_fits is not None:
                    self.check_fits(desc)
            except UnknownModelError as exc:
                raise ModelNotFoundError(str(exc)) from None
            except NotImplementedError as exc:
                raise BadInputError(str(exc)) from None
            except BadInputError:
                await asyncio.to_thread(self.engine.unload_model, name)
                raise
            except Exception as exc:  # a bad manifest, missing weights, a failed build
                log.exception("could not load %s", name)
                raise BadInputError(
                    f"could not load {name!r}: {type(exc).__name__}: {exc}"
                ) from None
            await self._start_model(desc.name, desc)
            log.info("loaded %s in %.1f s", desc.name, time.monotonic() - started)
            self._announce()
            return dict(self.models)

    async def unload(self, name: str) -> dict[str, ModelDescription]:
        """Stop admitting the model's requests, let its queued and running batches finish
        (at most ESCORT_DRAIN_TIMEOUT_S), then release it."""
        async with self._repository_lock:
            if name not in self.models:
                served = ", ".join(self.models) or "none"
                raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {served}")
            self._unloading[name] = self.models.pop(name)
            self._announce()  # the workers stop admitting it before its queues drain
            # The batchers stay registered while they drain: a request a worker admitted just
            # before the news still reaches the queue and is answered, not refused 404.
            for key in [k for k in self.batchers if k[0] == name]:
                if not await self.batchers[key].drain(self.settings.drain_timeout_s):
                    log.warning("unload %s/%s: drain timeout, failing what is left", *key)
                await self.batchers.pop(key).close()
            del self._unloading[name]
            self.metrics.model_ready.labels(name).set(0)
            assert self.engine is not None
            await asyncio.to_thread(self.engine.unload_model, name)
            log.info("unloaded %s", name)
            return dict(self.models)

    async def submit(
        self,
        model: str,
        backend: str,
        rows: Sequence[np.ndarray],
        deadline: float,
        timeline: Timeline | None = None,
    ) -> np.ndarray:
        batcher = self.batchers.get((model, backend))
        if batcher is None:  # unloaded since the request was admitted
            raise ModelNotFoundError(f"model {model!r} is not loaded")
        return await batcher.submit(rows, deadline, timeline)

    def admit(self, model: str, backend: str, rows: int, deadline: float) -> None:
        batcher = self.batchers.get((model, backend))
        if batcher is not None:
            batcher.admit(rows, deadline)

    def backlog(self, model: str, backend: str) -> Backlog | None:
        """The batcher's backlog, for the answers to an HTTP worker (see Backlog)."""
        batcher = self.batchers.get((model, backend))
        return batcher.backlog() if batcher is not None else None

    async def totals(self, model: str) -> BatchTotals:
        batchers = [b for (name, _), b in self.batchers.items() if name == model]
        return BatchTotals(
            batches=sum(b.batches_run for b in batchers),
            images=sum(b.images_run for b in batchers),
            queue_ns=sum(b.queue_ns for b in batchers),
            compute_ns=sum(b.compute_ns for b in batchers),
        )

    async def close(self) -> None:
        if self._memory_task is not None:
            self._memory_task.cancel()
        for batcher in self.batchers.values():
            await batcher.close()
        for name, _backend in self.batchers:
            self.metrics.model_ready.labels(name).set(0)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
