"""Fixtures for the operations tests: servers in subprocesses on free ports, and a way to run
the headless load test as `make loadtest` does (its own process, since Locust monkey-patches
the standard library on import)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port(span: int = 1) -> int:
    """A port p with p .. p+span-1 all free now (replica runs use consecutive ports)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + span <= 65535 and all(_free(port + i) for i in range(1, span)):
            return port
    raise RuntimeError(f"no {span} consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        ready = server.url + "/v2/health/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"server not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def serve(command: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[Server]:
    """Start a server process and stop it (SIGTERM, then SIGKILL) when done."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            # gRPC off unless asked for: these servers speak HTTP, and each would take 8001.
            command,
            cwd=ROOT,
            env={**os.environ, "ESCORT_GRPC": "false", **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def standin(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The stand-in service (tests/ops/standin_app.py); parametrize indirectly with a dict of
    STANDIN_* settings."""
    settings = getattr(request, "param", {}) or {}
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "tests.ops.standin_app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with serve(command, settings, port, tmp_path / "standin.log") as server:
        wait_ready(server, 30)
        yield server


def run_loadtest(env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`python -m loadtest.run` with LOADTEST_* settings, as `make loadtest` runs it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "loadtest.run"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A real PNG with a plausible size, decodable by Pillow."""
    from PIL import Image

    assert path.is_file(), f"{path} is missing"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 200, image.size
