"""The real process layout (supervisor, engine core process, several HTTP workers) with the
fake engine in the engine process, over real HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
from tests.service.servers import ProcessServer
from tests.v2_bodies import tensor_body

V2 = f"/v2/models/{FAKE_MODEL}/infer"
WORKERS = 3


def total(text: str, name: str, **labels: str) -> float:
    found = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found += sample.value
    return found


def per_worker(text: str, name: str) -> dict[str, float]:
    """One sample per HTTP worker (label worker: its pid) -> its value."""
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


@pytest.fixture(scope="module")
def server():
    env = {
        "ESCORT_MODELS": FAKE_MODEL,
        "ESCORT_BACKENDS": "sparse,dense",
        "ESCORT_WORKERS": str(WORKERS),
        "ESCORT_WORKER_SLOTS": "16",
        "ESCORT_MAX_BATCH_DELAY_MS": "10",
    }
    with ProcessServer("tests.service.fake_server", env) as running:
        yield running


def probabilities(response) -> np.ndarray:
    body = response.json()
    output = body["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def test_every_answer_is_its_own_request_s_across_workers(server: ProcessServer) -> None:
    reference = FakeEngine()
    marks = [i / 50 for i in range(60)]
    with server.client() as http, ThreadPoolExecutor(12) as pool:
        responses = list(
            pool.map(lambda m: http.post(V2, json=tensor_body(marked_tensor(m))), marks)
        )
    assert [r.status_code for r in responses] == [200] * len(marks)
    for mark, response in zip(marks, responses, strict=True):
        expected = reference.reference(marked_tensor(mark))
        np.testing.assert_allclose(probabilities(response), expected, rtol=1e-6)


def test_metrics_add_up_over_every_process(server: ProcessServer) -> None:
    with server.client() as http:
        before = total(http.get("/metrics").text, "escort_requests_total", code="200")
        for i in range(10):
            assert http.post(V2, json=tensor_body(marked_tensor(i / 10, rows=2))).status_code == 200
    # New connections land on any worker: each scrape must see every worker's requests.
    scrapes = []
    for _ in range(2 * WORKERS):
        with server.client() as http:
            scrapes.append(http.get("/metrics").text)
    for text in scrapes:
        assert total(text, "escort_requests_total", code="200") == before + 10
        # Engine-side series (the engine process) appear beside the workers' ones.
        assert total(text, "escort_batch_size_sum") >= 20
        assert total(text, "escort_model_ready", model=FAKE_MODEL) == 1
        assert total(text, "escort_layer_sparsity", layer="conv2") == pytest.approx(0.9)
    # The engine's timeline crosses the pipe: the round trip holds its hand-offs and its batch.
    parts = {
        stage: total(scrapes[0], "escort_stage_duration_seconds_sum", stage=stage)
        for stage in ("dispatch", "to_engine", "back")
    }
    assert total(scrapes[0], "escort_stage_duration_seconds_count", stage="to_engine") >= 10
    assert parts["to_engine"] > 0 and parts["back"] > 0
    assert parts["to_engine"] + parts["back"] < parts["dispatch"]
    compute = total(scrapes[0], "escort_compute_duration_seconds_sum")
    assert parts["dispatch"] >= compute  # every batch answers a request whose trip holds it
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run(
            [promtool, "check", "metrics"], input=scrapes[0].encode(), capture_output=True
        )
        assert result.returncode == 0 and not result.stdout.strip(), result.stdout.decode()


def test_each_worker_reports_its_connections_and_cpu(server: ProcessServer) -> None:
    # Five keep-alive clients, each held open while the others connect and send.
    clients = [server.client() for _ in range(5)]
    try:
        for i, http in enumerate(clients):
            assert http.post(V2, json=tensor_body(marked_tensor(i / 10))).status_code == 200
        # Each worker refreshes its series every second: wait for one round past the sends.
        time.sleep(1.5)
        with server.client() as http:
            text = http.get("/metrics").text
    finally:
        for http in clients:
            http.close()
    pids = set(per_worker(text, "escort_worker_connections"))
    assert len(pids) == WORKERS  # one series per worker, none from the engine process
    # The five clients (and the scrape) hold connections somewhere among the workers.
    assert total(text, "escort_worker_connections") >= 5
    cpu = [total(text, "escort_worker_cpu_seconds_total", worker=pid) for pid in pids]
    assert all(seconds > 0 for seconds in cpu)


def test_connections_spread_over_every_worker(server: ProcessServer) -> None:
    # A burst of 48 connections, then a request on each. Per-worker listeners (the default on
    # Linux): the kernel hashes each connection to one worker's own socket, so all 48 miss
    # some worker with odds of about 1e-8.
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    clients = [socket.create_connection((host, int(port)), timeout=10) for _ in range(48)]
    try:
        for client in clients:
            client.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        for client in clients:
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # a refresh of every worker's series past the connects
        with server.client() as http:
            text = http.get("/metrics").text
    finally:
        for client in clients:
            client.close()
    held = per_worker(text, "escort_worker_connections")
    assert len(held) == WORKERS and sum(held.values()) >= 48
    assert min(held.values()) >= 1, held
    if os.path.exists("/proc/net/tcp"):
        # Each worker holds a listening socket of its own on the port (not one shared).
        listening = _listening_inodes(int(port))
        owned = [listening & _socket_inodes(int(pid)) for pid in held]
        assert all(len(inodes) == 1 for inodes in owned), owned
        assert len(set.union(*owned)) == WORKERS


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1:port (/proc/net/tcp, state 0A)."""
    with open("/proc/net/tcp") as handle:
        rows = [line.split() for line in handle.readlines()[1:]]
    return {row[9] for row in rows if row[3] == "0A" and row[1] == f"0100007F:{port:04X}"}


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
    return found


def test_a_request_larger_than_a_worker_s_slots_gets_503(server: ProcessServer) -> None:
    with server.client() as http:
        response = http.post(V2, json=tensor_body(marked_tensor(0.5, rows=17)))
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert "ESCORT_WORKER_SLOTS" in response.json()["error"]
        # The refusal took nothing: the next request still has all its slots.
        ok = http.post(V2, json=tensor_body(marked_tensor(0.5, rows=16)))
        assert ok.status_code == 200 and probabilities(ok).shape == (16, 10)


def test_statistics_come_from_the_engine_process(server: ProcessServer) -> None:
    with server.client() as http:
        assert http.post(V2, json=tensor_body(marked_tensor(0.3))).status_code == 200
        stats = http.get(f"/v2/models/{FAKE_MODEL}/stats").json()["model_stats"][0]
    assert stats["inference_count"] >= 1 and stats["execution_count"] >= 1
    assert stats["inference_stats"]["compute_infer"]["ns"] > 0


def test_sigterm_drains_every_worker() -> None:
    env = {
        "ESCORT_MODELS": FAKE_MODEL,
        "ESCORT_BACKENDS": "sparse",
        "ESCORT_WORKERS": str(WORKERS),
        "ESCORT_MAX_BATCH_SIZE": "2",
        "FAKE_DELAY_S": "0.3",
    }
    with ProcessServer("tests.service.fake_server", env) as server:
        with ThreadPoolExecutor(9) as pool:

            def one(i: int):
                with server.client() as http:  # a connection each: spread over workers
                    return http.post(V2, json=tensor_body(marked_tensor(i / 10)))

            futures = [pool.submit(one, i) for i in range(9)]
            time.sleep(0.5)
            server.terminate()
            codes = [f.result(timeout=60).status_code for f in futures]
        assert codes == [200] * 9
        assert server.wait(60) == 0, server.output()


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    try:
        with open(path) as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_a_dead_worker_takes_the_service_down_with_exit_code_1() -> None:
    env = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_BACKENDS": "sparse", "ESCORT_WORKERS": "2"}
    with ProcessServer("tests.service.fake_server", env) as server:
        assert server.proc is not None
        spawned = [p for p in _children(server.proc.pid) if "spawn_main" in _role(p)]
        assert len(spawned) == 3  # the engine process and two workers
        os.kill(spawned[-1], signal.SIGKILL)  # the last one started: a worker
        assert server.wait(60) == 1, server.output()
        assert "exited (code -9)" in server.output()
        for pid in spawned:  # nothing is left behind
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in _status(pid)


def _status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return handle.read().lower()
    except OSError:
        return "zombie"


def test_clients_that_leave_free_their_slots() -> None:
    env = {
        "ESCORT_MODELS": FAKE_MODEL,
        "ESCORT_BACKENDS": "sparse",
        "ESCORT_WORKERS": "1",
        "ESCORT_WORKER_SLOTS": "8",
        "ESCORT_MAX_BATCH_SIZE": "1",
        "FAKE_DELAY_S": "0.2",
    }
    with ProcessServer("tests.service.fake_server", env) as server:
        with ThreadPoolExecutor(8) as pool:

            def leave(i: int) -> None:
                with (
                    httpx.Client(base_url=server.url, timeout=0.3) as http,
                    contextlib.suppress(httpx.TimeoutException),
                ):
                    http.post(V2, json=tensor_body(marked_tensor(i / 10)))

            list(pool.map(leave, range(8)))  # each gives up while its row waits
        # Every slot comes back once the engine answers for the rows it dropped: a request
        # that needs all eight of them is served.
        deadline = time.monotonic() + 10
        with server.client() as http:
            while True:
                response = http.post(V2, json=tensor_body(marked_tensor(0.5, rows=8)))
                if response.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert response.status_code == 200, response.text
            text = http.get("/metrics").text
        assert total(text, "escort_rejected_total", reason="client_disconnected") >= 1


def test_rows_reach_a_pinning_engine_through_prefetch_before_their_batch() -> None:
    """The engine process hands each request's rows to `Engine.prefetch_rows` as they arrive
    (a GPU engine starts their copies then); the fake engine fails any batch whose rows it
    was not handed first."""
    env = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_WORKERS": "2", "ESCORT_WORKER_SLOTS": "8",
           "FAKE_PIN": "1"}  # fmt: skip
    reference = FakeEngine()
    marks = [i / 20 for i in range(24)]
    with (
        ProcessServer("tests.service.fake_server", env) as server,
        server.client() as http,
        ThreadPoolExecutor(6) as pool,
    ):
        responses = list(
            pool.map(lambda m: http.post(V2, json=tensor_body(marked_tensor(m))), marks)
        )
    assert [r.status_code for r in responses] == [200] * len(marks), responses[0].text
    for mark, response in zip(marks, responses, strict=True):
        np.testing.assert_allclose(
            probabilities(response), reference.reference(marked_tensor(mark)), rtol=1e-6
        )
