"""Ways to run the service under test: in-process TestClient, uvicorn in a thread (real HTTP,
with the test holding the fake engine), and a separate process (signals, the real engine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from service.core.http_protocol import ConnectionLimits, protocol_class
from service.core.http_server import DrainingServer
from service.engine.protocol import Engine
from tests.service.fakes import FAKE_MODEL

REPO = Path(__file__).resolve().parents[2]
HTTP_TIMEOUT_S = 30.0


def make_settings(**overrides) -> Settings:
    values = {
        "models": (FAKE_MODEL,),
        "backend": "sparse",
        "backends": ("sparse", "dense"),
        "preprocess_workers": 2,
        "max_batch_delay_ms": 5.0,
        "drain_timeout_s": 10.0,
    }
    values.update(overrides)
    return Settings(**values)


def wait_ready(get, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = get("/v2/health/ready")
            if last.status_code == 200:
                return
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout_s} s: {last!r}")


@contextlib.contextmanager
def app_client(engine: Engine, **overrides) -> Iterator[TestClient]:
    """In-process client; the app is ready when this yields."""
    app = create_app(make_settings(**overrides), engine=engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client.get)
        yield client


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with contextlib.closing(bound_socket()) as sock:
        return sock.getsockname()[1]


class ThreadServer:
    """The real app under uvicorn in a background thread of the test process."""

    def __init__(self, engine: Engine, **overrides) -> None:
        self.settings = make_settings(**overrides)
        self.app = create_app(self.settings, engine=engine)
        self.sock = bound_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="on",
            http=protocol_class(ConnectionLimits.of(self.settings)),  # as serve() runs it
            timeout_keep_alive=self.settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        )
        self.server = DrainingServer(config, self.app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        with httpx.Client(base_url=self.url, timeout=5) as client:
            wait_ready(client.get)
        return self

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S, **kwargs)

    @property
    def state(self):
        return self.app.state.service

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


class ProcessServer:
    """`python -m <module>` with ESCORT_* settings in its environment, on a free port."""

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        ready_timeout_s: float = 120.0,
        cwd: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.env = {
            **os.environ,
            "ESCORT_HOST": "127.0.0.1",
            "ESCORT_PORT": str(self.port),
            "ESCORT_GRPC_PORT": str(self.grpc_port),
            # The repository first, then whatever the caller had (carried wheels on a GPU box).
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
            **env,
        }
        self.module = module
        self.ready_timeout_s = ready_timeout_s
        self.cwd = cwd or REPO
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProcessServer:
        # A file, not a pipe: a chatty server must never block on a full pipe.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=self.cwd,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        return self

    def __enter__(self) -> ProcessServer:
        self.start()
        assert self.proc is not None
        try:
            with httpx.Client(base_url=self.url, timeout=5) as client:
                deadline = time.monotonic() + self.ready_timeout_s
                while time.monotonic() < deadline:
                    if self.proc.poll() is not None:
                        raise AssertionError(f"server exited early:\n{self.output()}")
                    with contextlib.suppress(httpx.TransportError):
                        if client.get("/v2/health/ready").status_code == 200:
                            return self
                    time.sleep(0.1)
            raise AssertionError(f"server not ready in {self.ready_timeout_s} s")
        except BaseException:
            self.__exit__()
            raise

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S, **kwargs)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def wait_metric(
    server: ProcessServer, name: str, at_least: float, timeout_s: float = 6.0, **labels: str
) -> None:
    """Until the server's /metrics sum of `name` (its samples with `labels`) reaches
    `at_least`, so that a test acts only once requests have truly arrived where it needs them."""
    deadline = time.monotonic() + timeout_s
    with server.client() as http:
        while time.monotonic() < deadline:
            value = sum(
                sample.value
                for family in text_string_to_metric_families(http.get("/metrics").text)
                for sample in family.samples
                if sample.name == name and labels.items() <= sample.labels.items()
            )
            if value >= at_least:
                return
            time.sleep(0.02)
    raise AssertionError(f"{name}{labels} under {at_least} after {timeout_s} s")


def wait_in_flight(server: ProcessServer, at_least: int, timeout_s: float = 6.0) -> None:
    """Until the server counts `at_least` inference requests in flight (its workers' routes
    have them)."""
    wait_metric(server, "escort_inflight_requests", at_least, timeout_s)
