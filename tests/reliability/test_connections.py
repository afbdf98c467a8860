"""Connection-level limits against the real process layout, with raw sockets where a client
library cannot misbehave the way a case needs: slowloris, endless headers, slow bodies, early
answers to a body still being sent, pipelining, malformed requests, the connection cap."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time

import numpy as np
import pytest

from tests.reliability.resources import tree_fds, tree_rss_bytes
from tests.service.fakes import FAKE_MODEL
from tests.service.servers import ProcessServer
from tests.v2_bodies import tensor_body

MAX_CONNECTIONS = 24  # across the two workers: 12 each
HEADER_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0
MAX_HEADER_BYTES = 8192
REQUEST_TIMEOUT_S = 3.0
INFER = f"/v2/models/{FAKE_MODEL}/infer"

ENV = {
    "ESCORT_MODELS": FAKE_MODEL,
    "ESCORT_GRPC": "false",
    "ESCORT_WORKERS": "2",
    "ESCORT_PREPROCESS_WORKERS": "1",
    "ESCORT_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "ESCORT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "ESCORT_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
    "ESCORT_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "ESCORT_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "ESCORT_MAX_REQUEST_BYTES": str(1024 * 1024),
}


@pytest.fixture(scope="module")
def server():
    with ProcessServer("tests.service.fake_server", ENV) as running:
        yield running


def scrape(server: ProcessServer) -> str:
    with server.client() as http:
        return http.get("/metrics").text


def refused(text: str, reason: str) -> float:
    pattern = rf'^escort_connections_refused_total{{reason="{reason}"}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))


def connect(server: ProcessServer, timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body; raises on a reset or early EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed inside the body")
        body += chunk
    return status, headers, body[:length]


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes (EOF, after whatever answer it wrote) within `within_s`."""
    sock.settimeout(within_s)
    end = time.monotonic() + within_s
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def assert_json_error(headers: dict[str, str], body: bytes) -> None:
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert json.loads(body)["error"]


def metric_sum(server: ProcessServer, name: str, **labels: str) -> float:
    with server.client() as client:
        text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def infer_bytes() -> bytes:
    return json.dumps(tensor_body(np.ones((1, 3, 32, 32), np.float32))).encode()


def test_server_written_400_is_json(server):
    before = refused(scrape(server), "bad_request")
    with contextlib.closing(connect(server)) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 400
    assert_json_error(headers, body)
    assert refused(scrape(server), "bad_request") == before + 1


def test_idle_connection_is_closed(server):
    with contextlib.closing(connect(server)) as sock:
        assert closed_by_server(sock, KEEP_ALIVE_S + 4), "an idle connection stayed open"


def test_slowloris_connections_are_closed_and_capped(server):
    pid = server.proc.pid
    baseline = tree_fds(pid)
    socks = [connect(server) for _ in range(3 * MAX_CONNECTIONS)]
    request = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    try:
        for i in range(int((HEADER_TIMEOUT_S + 2) / 0.25)):  # a byte per socket every 0.25 s
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(request[i % len(request) : i % len(request) + 1])
            time.sleep(0.25)
        answers = []
        for sock in socks:
            sock.settimeout(3)
            try:
                answers.append(read_response(sock)[0])
            except (EOFError, OSError):
                answers.append(None)
        assert all(closed_by_server(sock, 3) for sock in socks), "slow headers kept a connection"
        # Those over the cap got 503 at once; those within it 408 at the header timeout.
        assert answers.count(503) >= len(socks) - MAX_CONNECTIONS, answers
        assert set(answers) <= {408, 503}, answers
        assert tree_fds(pid) < baseline + 10
        # Refusals no route saw are still counted, by reason, summed over the workers.
        text = scrape(server)
        for reason, status in (("header_timeout", 408), ("max_connections", 503)):
            assert refused(text, reason) >= answers.count(status), (reason, answers)
    finally:
        for sock in socks:
            sock.close()


def test_connection_cap_answers_503_with_retry_after(server):
    socks = [connect(server) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        answers = []
        for sock in socks:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in socks:
            status, headers, body = read_response(sock)
            answers.append(status)
            if status == 503:
                assert headers.get("retry-after"), headers
                assert_json_error(headers, body)
                assert closed_by_server(sock, 3)
        assert answers.count(200) <= MAX_CONNECTIONS, answers
        assert answers.count(503) >= len(socks) - MAX_CONNECTIONS, answers
    finally:
        for sock in socks:
            sock.close()


def _send_endless_header(server: ProcessServer, total: int, out: list) -> None:
    with contextlib.closing(connect(server, timeout_s=20)) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode())
        chunk = b"a" * 65536
        with contextlib.suppress(OSError):  # the server may stop reading once it has answered
            for _ in range(total // len(chunk)):
                sock.sendall(chunk)
        try:
            out.append(read_response(sock))
        except (EOFError, OSError) as exc:
            out.append(exc)


def test_endless_headers_get_431_and_memory_stays_bounded(server):
    pid = server.proc.pid
    before = tree_rss_bytes(pid)
    results: list = []
    threads = [
        threading.Thread(target=_send_endless_header, args=(server, 40 << 20, results))
        for _ in range(3)
    ]
    peak = before
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, tree_rss_bytes(pid))
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert peak - before < 40 << 20, f"RSS grew by {(peak - before) >> 20} MB"
    assert len(results) == 3
    for result in results:
        assert not isinstance(result, Exception), result
        status, headers, body = result
        assert status == 431
        assert_json_error(headers, body)


def test_oversized_headers_in_one_piece_with_the_body_get_431(server):
    body = infer_bytes()
    pad = "a" * (MAX_HEADER_BYTES + 100)
    with contextlib.closing(connect(server)) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, headers, answer = read_response(sock)
    assert status == 431
    assert_json_error(headers, answer)


def test_slow_body_gets_408_at_the_deadline(server):
    body = infer_bytes()
    with contextlib.closing(connect(server)) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        started = time.monotonic()
        sock.settimeout(0.3)
        answer = None
        for i in range(0, len(body), 4):  # 4 bytes every 0.3 s: far slower than the deadline
            if time.monotonic() - started > REQUEST_TIMEOUT_S + 5:
                break
            try:
                sock.sendall(body[i : i + 4])
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        elapsed = time.monotonic() - started
        assert answer, "the slow body was never answered"
        sock.settimeout(5)
        rest = answer
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in rest:
                rest += sock.recv(65536)
    assert rest.startswith(b"HTTP/1.1 408"), rest[:200]
    assert elapsed < REQUEST_TIMEOUT_S + 3


def test_unread_slow_body_does_not_hold_the_connection(server):
    with contextlib.closing(connect(server)) as sock:
        sock.sendall(b"POST /no/such/path HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0")
        status, _, _ = read_response(sock)
        assert status == 404  # answered at once, before the body
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < REQUEST_TIMEOUT_S + 5:
            try:
                sock.sendall(b"0")  # the body keeps trickling, for nobody
            except OSError:
                closed = True
            closed = closed or closed_by_server(sock, 0.3)
    assert closed, "a body nobody reads held the connection past the request deadline"


def _send_then_read(server: ProcessServer, head: bytes, body: bytes, out: list) -> None:
    try:
        with contextlib.closing(connect(server, timeout_s=20)) as sock:
            sock.sendall(head)
            for i in range(0, len(body), 16384):
                sock.sendall(body[i : i + 16384])
            out.append(read_response(sock)[0])
    except OSError as exc:
        out.append(exc)


@pytest.mark.parametrize(
    ("path", "content_type", "size", "expected"),
    [
        (INFER, "text/plain", 310_000, 415),
        ("/no/such/path", "application/json", 310_000, 404),
        (INFER, "application/json", 3 << 20, 413),
    ],
)
def test_early_answer_to_a_body_still_being_sent_is_read(
    server, path, content_type, size, expected
):
    body = b"0" * size
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    results: list = []
    threads = [
        threading.Thread(target=_send_then_read, args=(server, head, body, results))
        for _ in range(MAX_CONNECTIONS // 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [expected] * len(threads)


@pytest.fixture(scope="module")
def slow_server():
    env = {**ENV, "ESCORT_WORKERS": "1", "FAKE_DELAY_S": "1.5", "ESCORT_REQUEST_TIMEOUT_S": "20"}
    with ProcessServer("tests.service.fake_server", env) as running:
        yield running


def test_pipelined_request_of_a_gone_client_is_dropped(slow_server):
    body = infer_bytes()
    request = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    before_ok = metric_sum(slow_server, "escort_requests_total", protocol="v2", code="200")
    before_gone = metric_sum(slow_server, "escort_requests_total", protocol="v2", code="499")
    with contextlib.closing(connect(slow_server)) as busy:
        busy.sendall(request)  # keeps the engine busy while the pipelined pair queues
        time.sleep(0.3)
        with contextlib.closing(connect(slow_server)) as sock:
            sock.sendall(request + request)
            time.sleep(0.3)
        status, _, _ = read_response(busy)
        assert status == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gone = metric_sum(slow_server, "escort_requests_total", protocol="v2", code="499")
        if gone > before_gone:
            break
        time.sleep(0.2)
    time.sleep(2)  # time enough for a request that is (wrongly) computed to be counted
    ok = metric_sum(slow_server, "escort_requests_total", protocol="v2", code="200")
    assert ok - before_ok == 1, "the gone client's pipelined request was computed"
    assert gone > before_gone


def test_slow_body_does_not_hold_the_drain():
    env = {**ENV, "ESCORT_WORKERS": "1", "ESCORT_DRAIN_TIMEOUT_S": "30"}
    body = infer_bytes()
    with (
        ProcessServer("tests.service.fake_server", env) as running,
        contextlib.closing(connect(running)) as sock,
    ):
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.5)
        running.terminate()
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for i in range(10, len(body), 4):  # far slower than the deadline
                if running.proc.poll() is not None or time.monotonic() - started > 20:
                    break
                sock.sendall(body[i : i + 4])
                time.sleep(0.3)
        assert running.wait(30) == 0
        assert time.monotonic() - started < REQUEST_TIMEOUT_S + 8
