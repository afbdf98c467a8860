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

from service.batching import BatchQueue, Timeline
from service.config import Settings
from service.engine.protocol import Engine, ModelDescription
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

    @abstractmethod
    async def totals(self, model: str) -> BatchTotals:
        """Batches, images, queue and compute time of the model so far."""

    @abstractmethod
    async def close(self) -> None:
        """Fail what is queued, stop, and release the engine."""


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
        self._memory_task: asyncio.Task[None] | None = None

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
        engine = self.engine
        models = engine.describe()
        for name, desc in models.items():
            metrics.prepare_model(name, desc.backends, desc.layer_sparsity)
        self._memory_task = asyncio.get_running_loop().create_task(self._watch_memory())
        for name, desc in models.items():
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
            metrics.model_ready.labels(name).set(1)
        log.info(
            "engine ready: %s in %.1f s",
            ", ".join(f"{n} ({'/'.join(d.backends)})" for n, d in models.items()),
            time.monotonic() - started,
        )
        return dict(models)

    async def submit(
        self,
        model: str,
        backend: str,
        rows: Sequence[np.ndarray],
        deadline: float,
        timeline: Timeline | None = None,
    ) -> np.ndarray:
        return await self.batchers[(model, backend)].submit(rows, deadline, timeline)

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
