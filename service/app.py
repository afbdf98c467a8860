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
import os
import sys
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from service.api import docs_assets, health, repository, v1, v2
from service.api.grpc_service import start_grpc_server
from service.api.middleware import ServiceMiddleware
from service.api.state import ServiceState
from service.config import ConfigError, Settings, load_settings, unknown_environment_names
from service.dispatch import Dispatcher, EngineFactory, LocalDispatcher, default_engine_factory
from service.engine.protocol import Engine, EngineSpec
from service.errors import NotReadyError, ServiceError, register_error_handlers
from service.logs import SUPERVISOR, configure, is_config_error
from service.metrics import ServiceMetrics
from service.preprocess import Preprocessor

log = logging.getLogger("escort.app")

DispatcherFactory = Callable[[Settings, ServiceMetrics], Dispatcher]


def engine_spec(settings: Settings) -> EngineSpec:
    """What the engine should load, from the service's settings."""
    return EngineSpec(
        models=tuple(settings.models),
        backends=settings.loaded_backends,
        device=settings.device,
        precision=settings.precision,
        max_batch_size=settings.max_batch_size,
        batch_bucket_step=settings.batch_bucket_step,
        layer_profile_every=settings.layer_profile_every,
        models_dir=settings.models_dir,
        cache_dir=settings.cache_dir,
        cuda_graphs=settings.cuda_graphs,
        device_mirror=settings.device_mirror,
    )


async def _prepare(state: ServiceState, dispatcher: Dispatcher) -> None:
    """Start the dispatcher (load and warm the engine, or wait for the engine core), then
    flip readiness."""
    try:
        started = time.monotonic()
        state.dispatcher = dispatcher
        dispatcher.on_models = state.set_models  # loads and unloads, from whichever worker
        models = await dispatcher.start()
        state.set_models(models)
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
        if isinstance(exc, NotReadyError):
            # Only RemoteDispatcher.start raises it: the engine process could not load the
            # models and has logged why itself; a second copy of its error would only confuse.
            log.info("stopping: the engine process could not load the models")
        elif is_config_error(exc) or isinstance(exc, ServiceError):
            log.error("could not load the models: %s", exc)  # a setup mistake: no traceback
        else:
            log.exception("could not load the models")
        if state.on_load_failure is not None:
            state.on_load_failure()


# Prometheus keeps its connection to one worker, so the others must refresh their process
# metrics on their own rather than only when scraped.
PROCESS_REFRESH_S = 1.0


async def _refresh_process_metrics(metrics: ServiceMetrics) -> None:
    while True:
        metrics.refresh_process("worker")
        await asyncio.sleep(PROCESS_REFRESH_S)


async def _shutdown(state: ServiceState) -> None:
    state.begin_drain()
    # What is left of the one budget: the HTTP server's drain (DrainingServer) has usually
    # spent it already; gRPC calls still running then are cut by its server's stop below.
    if not await state.wait_quiet(state.drain_left_s()):
        log.warning("drain timeout: %d requests still in flight", state.inflight)
    for name in state.models:
        state.metrics.model_ready.labels(name).set(0)
    if state.dispatcher is not None:
        await state.dispatcher.close()
    state.preprocessor.close()


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    *,
    engine_factory: EngineFactory = default_engine_factory,
    dispatcher_factory: DispatcherFactory | None = None,
) -> FastAPI:
    """The service app. By default the engine runs in this process (`LocalDispatcher`); pass
    `engine` to serve an already built one (tests use a fake), or `dispatcher_factory` to
    reach an engine elsewhere (an HTTP worker of the engine core process)."""
    settings = settings or load_settings()
    expected = tuple(engine.describe()) if engine is not None else settings.model_names
    if dispatcher_factory is None:

        def dispatcher_factory(settings: Settings, metrics: ServiceMetrics) -> Dispatcher:
            return LocalDispatcher(settings, metrics, engine, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = ServiceMetrics(settings.max_batch_size)
        metrics.connection_count = getattr(app.state, "connection_count", None)
        preprocessor = Preprocessor(
            settings.preprocess_threads,
            settings.max_image_pixels,
            observe=lambda model, s: metrics.preprocess_duration.labels(model).observe(s),
        )
        state = ServiceState(settings, metrics, preprocessor, expected)
        state.on_load_failure = getattr(app.state, "on_load_failure", None)
        app.state.service = state
        dispatcher = dispatcher_factory(settings, metrics)
        preparing = asyncio.create_task(_prepare(state, dispatcher), name="prepare-engine")
        refreshing = asyncio.create_task(_refresh_process_metrics(metrics), name="process-metrics")
        grpc_server = None
        try:
            if getattr(app.state, "grpc_port", None):  # set by serve(): a server process
                grpc_server = await start_grpc_server(
                    lambda: app.state.service, settings.host, app.state.grpc_port,
                    settings.max_request_bytes,
                )  # fmt: skip
            yield
        finally:
            refreshing.cancel()
            preparing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await preparing
            await _shutdown(state)
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)

    app = FastAPI(
        title="Escort Serve",
        summary="Pruned CNN inference on the Escort direct sparse convolution",
        version=v2.server_version(),
        lifespan=lifespan,
        docs_url=None,  # served offline by docs_assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.service = None
    register_error_handlers(app)
    app.add_middleware(
        ServiceMiddleware, state_of=lambda scope: getattr(scope["app"].state, "service", None)
    )
    app.include_router(health.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    app.include_router(v1.router)
    app.include_router(docs_assets.router)
    return app


def main(argv: list[str] | None = None) -> int:
    """`escort serve [flags]`: build the settings (flags over ESCORT_* variables over the TOML
    file over the defaults) and serve them with the supervisor layout. The Settings built here
    are what the supervisor pickles to the engine process and the workers, so a flag reaches
    every process."""
    from service.cli import parse_serve_args
    from service.config import CONFIG_FILE_VAR
    from service.core.supervisor import run_service

    try:
        args = parse_serve_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error argparse has already printed (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.config is not None:
        if not os.path.isfile(args.config):
            print(f"escort serve: --config {args.config}: no such file", file=sys.stderr)
            return 2
        # Settings reads the file's name from the environment when it lists its sources, so
        # it has to be there before they are built; a flag wins over an ESCORT_CONFIG already
        # set, as every flag does.
        os.environ[CONFIG_FILE_VAR] = args.config
    try:
        settings = load_settings(flags=args.settings)
    except ConfigError as exc:
        print(f"escort serve: {exc}", file=sys.stderr)
        return 2
    configure(SUPERVISOR, settings.log_level)
    for name in unknown_environment_names():
        log.warning(
            "%s is not a setting and is ignored (python -m service.config lists them)", name
        )
    return run_service(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
