"""The HTTP server of one process: uvicorn with the app, its connection limits, and a drain
on SIGTERM (readiness false, new work refused, requests in flight finished, exit code 0)."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.state import ServiceState
from service.config import Settings
from service.logs import uvicorn_log_config

log = logging.getLogger("escort.app")


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


def serve(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Run `app` with uvicorn in this process until it is told to stop; on `sockets` when
    given (an HTTP worker's share of the supervisor's listener), else on host:port."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        access_log=settings.access_log,
        log_config=uvicorn_log_config(settings.log_level),  # timestamps on uvicorn's lines
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        lifespan="on",
    )
    server = DrainingServer(config, app)
    app.state.grpc_port = settings.grpc_port if settings.grpc else None
    # For the per-worker metrics: how many connections this server holds open.
    app.state.connection_count = lambda: len(server.server_state.connections)

    def stop_on_load_failure() -> None:
        server.should_exit = True

    app.state.on_load_failure = stop_on_load_failure
    server.run(sockets=sockets)
    state: ServiceState | None = getattr(app.state, "service", None)
    if state is not None and state.load_error:
        return 1
    return 0
