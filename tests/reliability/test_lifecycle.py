"""The lifecycle under load, against the real process layout (supervisor, engine process, HTTP
workers on per-worker SO_REUSEPORT listeners): SIGTERM under sustained load, a second SIGTERM,
the drain deadline with a slow upload in flight, and a client that leaves mid-upload."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.core.supervisor import WORKER_STOP_GRACE_S
from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
from tests.service.servers import ProcessServer, ThreadServer, wait_in_flight
from tests.service.test_lifecycle import metric_value
from tests.v2_bodies import tensor_body

V2 = f"/v2/models/{FAKE_MODEL}/infer"
BODY = json.dumps(tensor_body(marked_tensor(0.4))).encode()

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    return {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_BACKENDS": "sparse", "ESCORT_GRPC": "false",
            "ESCORT_LOG_LEVEL": "warning", **extra}  # fmt: skip


def _outcome(call) -> str:
    """What one attempt got: its status (with '+retry' when a 503 says when to retry),
    'refused' when no listener took the connection (a clean refusal: nothing was sent), or
    the transport error's name (a reset, a response cut off: the request was lost)."""
    try:
        response = call()
    except httpx.ConnectError:
        return "refused"
    except httpx.TransportError as exc:
        return type(exc).__name__
    if response.status_code == 503 and "Retry-After" in response.headers:
        return "503+retry"
    return str(response.status_code)


def test_sigterm_under_load_answers_or_refuses_every_attempt() -> None:
    env = _env(ESCORT_WORKERS="2", ESCORT_MAX_BATCH_SIZE="4", ESCORT_DRAIN_TIMEOUT_S="10",
               FAKE_DELAY_S="0.2")  # fmt: skip
    before: list[str] = []
    during: list[str] = []
    signalled = threading.Event()
    gone = threading.Event()

    def load(keep_alive: bool) -> None:
        # Half the clients keep their connections, half open one per request: both kinds of
        # client must see an answer or a refused connection, never a reset.
        headers = {"Content-Type": "application/json"}
        limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0)
        with httpx.Client(base_url=server.url, timeout=30, limits=limits) as http:
            while not gone.is_set():
                started_before = not signalled.is_set()
                outcome = _outcome(lambda: http.post(V2, content=BODY, headers=headers))
                (before if started_before else during).append(outcome)

    with ProcessServer("tests.service.fake_server", env) as server, ThreadPoolExecutor(8) as pool:
        loaders = [pool.submit(load, i % 2 == 0) for i in range(8)]
        wait_in_flight(server, 4)
        time.sleep(1.0)
        signalled.set()
        server.terminate()
        code = server.wait(30)
        time.sleep(0.3)  # a few attempts after the exit: refused
        gone.set()
        for loader in loaders:
            loader.result(timeout=60)
        assert code == 0, server.output()
    assert before and set(before) <= {"200", "503+retry"}, sorted(set(before))
    assert "503+retry" in during and "refused" in during
    lost = [o for o in during if o not in ("200", "503+retry", "refused")]
    assert not lost, f"{len(lost)} of {len(during)} attempts lost: {sorted(set(lost))}"


def test_a_second_sigterm_shortens_the_drain_and_answers_every_request() -> None:
    env = _env(ESCORT_WORKERS="2", ESCORT_MAX_BATCH_SIZE="1", ESCORT_DRAIN_TIMEOUT_S="30",
               FAKE_DELAY_S="1.5")  # fmt: skip
    headers = {"Content-Type": "application/json"}
    with (
        ProcessServer("tests.service.fake_server", env) as server,
        ThreadPoolExecutor(8) as pool,
        server.client() as http,
    ):
        futures = [
            pool.submit(_outcome, lambda: http.post(V2, content=BODY, headers=headers))
            for _ in range(8)
        ]
        wait_in_flight(server, 8)
        server.terminate()
        time.sleep(0.5)
        started = time.monotonic()
        server.terminate()
        code = server.wait(30)
        stopped_s = time.monotonic() - started
        outcomes = [f.result(timeout=30) for f in futures]
    assert code == 0, server.output()
    # Eight requests of 1.5 s each, one at a time: a full drain would take 12 s.
    assert stopped_s < 6, stopped_s
    assert set(outcomes) <= {"200", "503+retry"}, outcomes
    assert "503+retry" in outcomes


def _slow_upload(port: int, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST {V2} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def test_the_drain_deadline_answers_a_slow_upload_503_and_exits_on_time() -> None:
    drain_s = 4.0
    env = _env(ESCORT_WORKERS="1", ESCORT_DRAIN_TIMEOUT_S=str(drain_s),
               ESCORT_REQUEST_TIMEOUT_S="120", ESCORT_HEADER_TIMEOUT_S="120")  # fmt: skip
    with ProcessServer("tests.service.fake_server", env) as server:
        upload = _slow_upload(server.port, 1_000_000)
        upload.sendall(b'{"inputs": [')
        wait_in_flight(server, 1)
        server.terminate()
        started = time.monotonic()
        answer = b""
        # A client still uploading, a little at a time, and reading whatever comes back.
        upload.settimeout(0.1)
        while time.monotonic() - started < 3 * drain_s and b"\r\n\r\n" not in answer:
            try:
                chunk = upload.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):  # the server may have closed its end
                    upload.sendall(b" " * 100)
                continue
            except OSError as exc:
                answer += f"<{type(exc).__name__}>".encode()
                break
            if not chunk:
                break
            answer += chunk
        upload.close()
        code = server.wait(30)
        stopped_s = time.monotonic() - started
    assert code == 0, server.output()
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"retry-after" in answer.lower(), answer[:400]
    # One drain budget (plus the moment it takes to answer and stop), not two.
    assert stopped_s < drain_s + 2.5, stopped_s


def test_a_client_that_leaves_mid_upload_counts_499() -> None:
    with ThreadServer(FakeEngine()) as server, server.client() as http:
        port = int(server.url.rsplit(":", 1)[1])
        for _ in range(3):
            upload = _slow_upload(port, 100_000)
            upload.sendall(b'{"inputs": [' + b" " * 5000)
            time.sleep(0.2)
            upload.close()
        for _ in range(100):
            text = http.get("/metrics").text
            if metric_value(text, "escort_requests_total", protocol="v2") >= 3:
                break
            time.sleep(0.05)
        counted = {
            code: metric_value(text, "escort_requests_total", protocol="v2", code=code)
            for code in ("499", "500", "400", "408")
        }
    assert counted == {"499": 3, "500": 0, "400": 0, "408": 0}, counted


def test_a_stuck_worker_is_killed_once_the_drain_budget_is_spent() -> None:
    """A worker that cannot drain (here stopped with SIGSTOP, as a blocked event loop would
    be) does not hold the stop past the budget: the supervisor kills it, says so, exits 1."""
    env = _env(ESCORT_WORKERS="1", ESCORT_DRAIN_TIMEOUT_S="1")
    with ProcessServer("tests.service.fake_server", env) as server:
        with server.client() as http:
            text = http.get("/metrics").text
        workers = set(re.findall(r'escort_worker_connections\{worker="(\d+)"\}', text))
        assert len(workers) == 1, text
        os.kill(int(workers.pop()), signal.SIGSTOP)
        started = time.monotonic()
        server.terminate()
        code = server.wait(60)
        took = time.monotonic() - started
        output = server.output()
    assert code == 1, output
    assert took < 1 + WORKER_STOP_GRACE_S + 5, (took, output)
    assert "did not stop within ESCORT_DRAIN_TIMEOUT_S" in output
