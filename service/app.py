"""The FastAPI app: its factory, its lifespan, and `main()` that serves it with uvicorn.

Lifespan: the app answers /v2/health/live at once; it loads the engine in a thread (slow),
warms every model and backend, starts one batcher per (model, backend), and only then turns
ready. On SIGTERM it turns not ready, refuses new work with 503, lets the requests in flight
finish (at most ESCORT_DRAIN_TIMEOUT_S), then stops and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api import health, v1, v2
from service.api.middleware import ServiceMiddleware
from service.api.state import ServiceState
from service.batching import BatchQueue
from service.config import ConfigError, Settings, load_settings, unknown_environment_names
from service.engine.protocol import Engine, EngineSpec
from service.errors import register_error_handlers
from service.metrics import ServiceMetrics
from service.preprocess import Preprocessor

log = logging.getLogger("escort.app")


def engine_spec(settings: Settings) -> EngineSpec:
    """What the engine should load, from the service's settings."""
    return EngineSpec(
        models=tuple(settings.models),
        backends=settings.loaded_backends,
        device=settings.device,
        precision=settings.precision,
        max_batch_size=settings.max_batch_size,
        layer_profile_every=settings.layer_profile_every,
        models_dir=settings.models_dir,
        cache_dir=settings.cache_dir,
        cuda_graphs=settings.cuda_graphs,
    )


def _load_engine(settings: Settings, metrics: ServiceMetrics) -> Engine:
    # Imported here: the engine pulls in torch, which the rest of the service never needs.
    from service.engine import load_engine

    return load_engine(engine_spec(settings), layer_observer=metrics.observe_layer, progress=True)


async def _prepare(state: ServiceState, engine: Engine | None) -> None:
    """Load (unless injected), warm, start the batchers, then flip readiness."""
    settings, metrics = state.settings, state.metrics
    try:
        started = time.monotonic()
        if engine is None:
            engine = await asyncio.to_thread(_load_engine, settings, metrics)
        state.engine = engine
        models = engine.describe()
        for name, desc in models.items():
            metrics.prepare_model(name, desc.backends, desc.layer_sparsity)
        probe = getattr(engine, "memory_stats", None)
        metrics.set_memory_probe(probe if callable(probe) else None)
        for name, desc in models.items():
            for backend in desc.backends:
                await asyncio.to_thread(engine.warmup, name, backend)
                batcher = BatchQueue(
                    name,
                    backend,
                    engine.infer,
                    metrics,
                    max_batch_size=min(settings.max_batch_size, desc.max_batch_size),
                    max_batch_delay_ms=settings.max_batch_delay_ms,
                    max_queue_size=settings.max_queue_size,
                    retry_after_s=settings.retry_after_s,
                )
                batcher.start()
                state.batchers[(name, backend)] = batcher
            metrics.model_ready.labels(name).set(1)
        state.models = dict(models)
        state.ready = True
        log.info(
            "ready: %s in %.1f s",
            ", ".join(f"{n} ({'/'.join(d.backends)})" for n, d in models.items()),
            time.monotonic() - started,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, LookupError | ValueError | OSError):
            log.error("could not load the models: %s", exc)  # a setup mistake: no traceback
        else:
            log.exception("could not load the models")
        if state.on_load_failure is not None:
            state.on_load_failure()


async def _shutdown(state: ServiceState) -> None:
    state.begin_drain()
    drain_s = state.settings.drain_timeout_s
    if not await state.wait_quiet(drain_s):
        log.warning("drain timeout: %d requests still in flight", state.inflight)
    for batcher in state.batchers.values():
        await batcher.close()
    for name in state.models:
        state.metrics.model_ready.labels(name).set(0)
    state.preprocessor.close()
    if state.engine is not None:
        await asyncio.to_thread(state.engine.close)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The service app. Pass `engine` to serve an already built Engine (tests use a fake)."""
    settings = settings or load_settings()
    expected = tuple(engine.describe()) if engine is not None else tuple(settings.models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = ServiceMetrics(settings.max_batch_size)
        preprocessor = Preprocessor(
            settings.preprocess_threads,
            settings.max_image_pixels,
            observe=lambda model, s: metrics.preprocess_duration.labels(model).observe(s),
        )
        state = ServiceState(settings, metrics, preprocessor, expected)
        state.on_load_failure = getattr(app.state, "on_load_failure", None)
        app.state.service = state
        preparing = asyncio.create_task(_prepare(state, engine), name="prepare-engine")
        try:
            yield
        finally:
            preparing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await preparing
            await _shutdown(state)

    app = FastAPI(
        title="Escort Serve",
        summary="Pruned CNN inference on the Escort direct sparse convolution",
        version=v2._version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    register_error_handlers(app)
    app.add_middleware(
        ServiceMiddleware, state_of=lambda scope: getattr(scope["app"].state, "service", None)
    )
    app.include_router(health.router)
    app.include_router(v2.router)
    app.include_router(v1.router)
    return app


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM (or SIGINT) drains first: readiness false, new work
    refused, requests in flight finished, then a normal stop and exit code 0. A second
    signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): it records the signal and re-raises it after shutdown, which
        # would end the process by the signal rather than with exit code 0.
        state: ServiceState | None = getattr(self._app.state, "service", None)
        if self._drain_started or state is None:
            self.force_exit = self._drain_started
            self.should_exit = True
            return
        self._drain_started = True
        log.info("signal %d: draining for at most %.0f s", sig, state.settings.drain_timeout_s)
        state.begin_drain()
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._stop_when_quiet(state)))

    async def _stop_when_quiet(self, state: ServiceState) -> None:
        if not await state.wait_quiet(state.settings.drain_timeout_s):
            log.warning("drain timeout: %d requests still in flight", state.inflight)
        self.should_exit = True


def serve(app: FastAPI, settings: Settings) -> int:
    """Run `app` with uvicorn (one worker, no reload) until it is told to stop."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        lifespan="on",
    )
    server = DrainingServer(config, app)

    def stop_on_load_failure() -> None:
        server.should_exit = True

    app.state.on_load_failure = stop_on_load_failure
    server.run()
    state: ServiceState | None = getattr(app.state, "service", None)
    if state is not None and state.load_error:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`escort serve`: build the settings from ESCORT_* variables and serve."""
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: escort serve\n\nConfigured by ESCORT_* environment variables or a TOML "
            "file named by ESCORT_CONFIG; `python -m service.config` lists them."
        )
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"escort serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in unknown_environment_names():
        log.warning(
            "%s is not a setting and is ignored (python -m service.config lists them)", name
        )
    return serve(create_app(settings), settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
