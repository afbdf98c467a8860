"""An HTTP worker process: the FastAPI app under uvicorn on its share of the listener, with a
RemoteDispatcher to the engine core process. Spawned by the supervisor."""

from __future__ import annotations

import logging
import os
import socket
import sys
from multiprocessing.connection import Connection

from service import logs
from service.app import create_app
from service.config import Settings
from service.core.client import RemoteDispatcher
from service.core.http_server import serve
from service.dispatch import Dispatcher
from service.metrics import ServiceMetrics

log = logging.getLogger("escort.worker")


def main(settings: Settings, sock: socket.socket, conn: Connection, index: int) -> None:
    # A process group of its own: a terminal's Ctrl-C reaches only the supervisor, which
    # passes one SIGTERM on; otherwise every worker would see two signals and stop at once.
    os.setpgrp()
    logs.configure(logs.worker_role(index), settings.log_level)
    app = None

    def stop() -> None:
        # The engine process is gone: in-flight requests got 503; nothing more can be served.
        if app is not None and app.state.on_load_failure is not None:
            app.state.on_load_failure()

    def dispatcher(settings: Settings, metrics: ServiceMetrics) -> Dispatcher:
        return RemoteDispatcher(settings, metrics, conn, on_lost=stop)

    app = create_app(settings, dispatcher_factory=dispatcher)
    sys.exit(serve(app, settings, sockets=[sock]))
