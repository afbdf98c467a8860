"""The HTTP server of one process: uvicorn with the app, its connection limits, and a drain
on SIGTERM (readiness false, new work refused, requests in flight finished, exit code 0)."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.middleware import abort_requests
from service.api.state import ServiceState
from service.config import Settings
from service.core.http_protocol import ConnectionLimits, protocol_class
from service.logs import uvicorn_log_config

log = logging.getLogger("escort.app")


# After the drain's deadline: time for the last answers (503 to what was still in flight) to
# be written and the connections closed. The whole stop takes ESCORT_DRAIN_TIMEOUT_S plus at
# most this (and the engine's own stop): one budget, which a pod's grace period must cover.
FINISH_S = 1.0
# After the listener closes: requests already sent on open connections (accepted a moment
# ago, or kept alive) still get their answer instead of a closed connection.
LAST_REQUESTS_S = 0.2


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM (or SIGINT) drains first: readiness false, new work
    answered 503 + Retry-After (the listener stays open for that), requests in flight
    finished until ESCORT_DRAIN_TIMEOUT_S, then answered 503; then the listener closes (the
    connections queued on it taken and answered, not reset), the connections close, and the
    process exits with code 0. A second signal brings the deadline forward to now."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        # One budget: the drain below is the graceful part; uvicorn's own graceful timeout
        # (which would run after it, doubling the stop) only waits for the last writes.
        config.timeout_graceful_shutdown = FINISH_S
        super().__init__(config)
        self._app = app
        self._hurry: asyncio.Event | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): it records the signal and re-raises it after shutdown, which
        # would end the process by the signal rather than with exit code 0.
        state: ServiceState | None = getattr(self._app.state, "service", None)
        if state is None:  # not started yet: nothing to drain
            self.should_exit = True
            return
        loop = asyncio.get_event_loop()
        if self._hurry is not None:
            log.info("signal %d again: answering the requests left 503 and stopping", sig)
            loop.call_soon_threadsafe(self._hurry.set)
            return
        self._hurry = asyncio.Event()
        log.info("signal %d: draining for at most %.0f s", sig, state.settings.drain_timeout_s)
        state.begin_drain()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(state, self._hurry)))

    async def _drain(self, state: ServiceState, hurry: asyncio.Event) -> None:
        quiet = asyncio.ensure_future(state.wait_quiet(state.settings.drain_timeout_s))
        hurried = asyncio.ensure_future(hurry.wait())
        await asyncio.wait({quiet, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not (quiet.done() and quiet.result()):
            quiet.cancel()
            stopped = abort_requests(self._app)
            log.warning("drain deadline: %d requests still in flight answered 503", stopped)
            await state.wait_quiet(FINISH_S)
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop_accepting()
        await asyncio.sleep(LAST_REQUESTS_S)
        await super().shutdown(sockets)

    def _stop_accepting(self) -> None:
        """Close the listeners without resetting the connections queued on them: with a
        listener per worker (SO_REUSEPORT) nobody else would accept those, and closing a
        listening socket resets them. Take them first, then close it at once (the kernel
        sends new connections to the other workers' listeners, or refuses them once all are
        closed), and serve what was taken like any other connection."""
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        taken: list[socket.socket] = []
        for server in self.servers:
            for listener in server.sockets:
                loop.remove_reader(listener.fileno())
                # A second handle on the same listening socket, for accept() (asyncio's own
                # handle refuses direct use); closed before the listener itself.
                handle = socket.fromfd(listener.fileno(), listener.family, listener.type)
                handle.setblocking(False)
                with handle:
                    while True:
                        try:
                            taken.append(handle.accept()[0])
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            break  # e.g. too many open files: leave the rest to the kernel
            server.close()
        for conn in taken:
            loop.create_task(loop.connect_accepted_socket(protocol, conn))


def serve(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Run `app` with uvicorn in this process until it is told to stop; on `sockets` when
    given (an HTTP worker's share of the supervisor's listener), else on host:port. The
    connection limits are those of service.core.http_protocol; a worker takes its share of
    ESCORT_MAX_CONNECTIONS (not uvicorn's limit_concurrency, which counts tasks as well as
    connections, answers in text/plain without Retry-After, and only once headers arrive)."""
    processes = settings.worker_processes if sockets is not None else 1

    def count_refusal(reason: str) -> None:
        state: ServiceState | None = getattr(app.state, "service", None)
        if state is not None:
            state.metrics.connections_refused.labels(reason).inc()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        http=protocol_class(ConnectionLimits.of(settings, processes), count_refusal),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        log_level=settings.log_level,
        access_log=settings.access_log,
        log_config=uvicorn_log_config(settings.log_level),  # timestamps on uvicorn's lines
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
