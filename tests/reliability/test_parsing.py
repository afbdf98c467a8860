"""Hostile JSON on the V2 infer route, against a real server: nesting that would overflow a
recursive parser, bytes that are not UTF-8, numbers too large for any integer, values of the
wrong JSON type where the V2 spec names one, and a body of tens of megabytes of numbers, whose
parsing must neither stall the event loop (liveness answers meanwhile) nor take many times
the body in memory."""

from __future__ import annotations

import json
import socket
import threading
import time

import h11
import httpx
import numpy as np
import pytest

from service.api import v2_json
from tests.reliability.resources import tree_rss_bytes
from tests.service.fakes import FAKE_MODEL, FakeEngine
from tests.service.servers import ProcessServer, ThreadServer

V2 = f"/v2/models/{FAKE_MODEL}/infer"
CHW = (3, 32, 32)
ROW = CHW[0] * CHW[1] * CHW[2]
JSON_HEADERS = {"Content-Type": "application/json"}


def tensor_json(data: str, shape: str = "[1,3,32,32]", datatype: str = "FP32", extra: str = ""):
    """A V2 body written out by hand (no encoder would write these values)."""
    return (
        f'{{{extra}"inputs":[{{"name":"input","shape":{shape},"datatype":"{datatype}",'
        f'"data":{data}}}]}}'
    ).encode()


def halves(count: int = ROW) -> str:
    """A JSON list of `count` numbers (0.5 each)."""
    return "[" + ",".join(["0.5"] * count) + "]"


@pytest.fixture(scope="module")
def server():
    with ThreadServer(FakeEngine()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with server.client() as http:
        yield http


def assert_json_error(response: httpx.Response, statuses: tuple[int, ...]) -> str:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert message
    return message


DEPTH = 100_000

NESTED = {
    "data": tensor_json("[" * DEPTH + "]" * DEPTH),
    "parameters": tensor_json(
        halves(), extra='"parameters":{"x":' + "[" * DEPTH + "]" * DEPTH + "},"
    ),
    "document": b"[" * DEPTH + b"]" * DEPTH,
    "objects": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
}


@pytest.mark.parametrize("where", sorted(NESTED))
def test_deeply_nested_json_is_400(client, where):
    # A nested array where the object belongs is refused at its first bracket, as not an object.
    statuses = (400, 422) if where == "document" else (400,)
    response = client.post(V2, content=NESTED[where], headers=JSON_HEADERS)
    assert "JSON" in assert_json_error(response, statuses)


BINARY_HEADER = (
    b'{"id":"\xff","inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32",'
    b'"parameters":{"binary_data_size":12288}}]}'
)
NOT_UTF8 = {
    "latin1-id": tensor_json(halves(), extra='"id":"caf\xe9",').decode().encode("latin-1"),
    "bom-utf16": "\ufeff".encode("utf-16-le") + tensor_json(halves()).decode().encode("utf-16-le"),
    "stray-byte": b"\xff" + tensor_json(halves()),
    "binary-extension-header": (BINARY_HEADER + bytes(4 * ROW), str(len(BINARY_HEADER))),
    "in-bytes-data": (
        b'{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":["\xc3\x28"]}]}'
    ),
}


def exchange(sock: socket.socket, conn: h11.Connection, body: bytes, headers: dict) -> int:
    """One POST on a raw keep-alive socket, read whole with h11: its status (a reset raises)."""
    fields = [("Host", "test"), ("Content-Length", str(len(body))), *headers.items()]
    sock.sendall(conn.send(h11.Request(method="POST", target=V2, headers=fields)))
    sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status


@pytest.mark.parametrize("case", sorted(NOT_UTF8))
def test_body_that_is_not_utf8_is_400(server, client, case):
    body, headers = NOT_UTF8[case], JSON_HEADERS
    if isinstance(body, tuple):  # a binary-extension body, with its JSON header's length
        body, headers = body[0], {"Inference-Header-Content-Length": body[1]}
    assert_json_error(client.post(V2, content=body, headers=headers), (400,))
    # On a raw socket: answered in full, not reset, and the connection goes on working.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        conn = h11.Connection(our_role=h11.CLIENT)
        assert exchange(sock, conn, body, headers) == 400
        assert exchange(sock, conn, tensor_json(halves()), JSON_HEADERS) == 200


HUGE = "1" + "0" * 400
HUGE_NUMBERS = {
    "timeout": tensor_json(halves(), extra=f'"parameters":{{"timeout":{HUGE}}},'),
    "negative-timeout": tensor_json(halves(), extra=f'"parameters":{{"timeout":-{HUGE}}},'),
    "binary-size": (
        b'{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":' + HUGE.encode() + b"}}]}"
    ),
    "shape": tensor_json(halves(), shape=f"[{HUGE},3,32,32]"),
    "classification": tensor_json(halves())[:-1]
    + f',"outputs":[{{"name":"probabilities","parameters":{{"classification":{HUGE}}}}}]}}'.encode(),
}


@pytest.mark.parametrize("case", sorted(HUGE_NUMBERS))
def test_integer_too_large_is_4xx_not_500(client, case):
    response = client.post(V2, content=HUGE_NUMBERS[case], headers=JSON_HEADERS)
    assert_json_error(response, (400, 422))


# The V2 spec types `data` by `datatype` (FP32/FP16: numbers, BYTES: strings), `shape` as
# int64s, and parameters as bool, int64 or string: a value of another JSON type is refused.
WRONG_TYPES = {
    "fp32-strings": tensor_json("[" + ",".join(['"1.5"'] * ROW) + "]"),
    "fp32-one-string": tensor_json(halves(ROW - 1)[:-1] + ',"1.5"]'),
    "fp32-booleans": tensor_json("[" + ",".join(["true"] * ROW) + "]"),
    "fp32-one-boolean": tensor_json(halves(ROW - 1)[:-1] + ",false]"),
    "fp32-null": tensor_json(halves(ROW - 1)[:-1] + ",null]"),
    "fp32-object": tensor_json(halves(ROW - 1)[:-1] + ',{"v":1}]'),
    "fp32-scalar": tensor_json("0.5", shape="[1,1,1,1]"),
    "fp16-strings": tensor_json("[" + ",".join(['"1.5"'] * ROW) + "]", datatype="FP16"),
    "fp16-booleans": tensor_json("[" + ",".join(["true"] * ROW) + "]", datatype="FP16"),
    "nan-literal": tensor_json(halves(ROW - 1)[:-1] + ",NaN]"),
    "infinity-literal": tensor_json(halves(ROW - 1)[:-1] + ",-Infinity]"),
    "fp32-empty-sublists": tensor_json("[[],[]," + halves(ROW)[1:]),
    "fp32-one-too-many": tensor_json(halves(ROW + 1)),
    "fp32-one-too-few": tensor_json(halves(ROW - 1)),
    "fp32-rows-beyond-limit": tensor_json(halves(), shape="[1000000000000000,3,32,32]"),
    "fp16-one-string": tensor_json(halves(ROW - 1)[:-1] + ',"1"]', datatype="FP16"),
    "fp16-out-of-range": tensor_json(halves(ROW - 1)[:-1] + ",70000]", datatype="FP16"),
    "bytes-numbers": b'{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":[1]}]}',
    "bytes-boolean": b'{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":[true]}]}',
    "shape-boolean": tensor_json(halves(), shape="[true,3,32,32]"),
    "shape-float": tensor_json(halves(), shape="[1.0,3,32,32]"),
    "shape-string": tensor_json(halves(), shape='["1",3,32,32]'),
    "timeout-boolean": tensor_json(halves(), extra='"parameters":{"timeout":true},'),
    "timeout-float": tensor_json(halves(), extra='"parameters":{"timeout":1.5},'),
    "binary-output-int": tensor_json(halves(), extra='"parameters":{"binary_data_output":1},'),
    "datatype-number": tensor_json(halves()).replace(b'"FP32"', b"32"),
    "name-number": tensor_json(halves()).replace(b'"input"', b"7"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_value_of_the_wrong_json_type_is_4xx(client, case):
    response = client.post(V2, content=WRONG_TYPES[case], headers=JSON_HEADERS)
    status = 400 if case.startswith(("fp", "nan", "inf", "bytes")) else 422
    assert_json_error(response, (status,))


def test_json_numbers_are_read_exactly_across_chunks(client, monkeypatch):
    # Small chunks put many chunk boundaries inside numbers; nesting and exponents vary.
    monkeypatch.setattr(v2_json, "_TEXT_CHUNK", 997)
    tensor = np.random.default_rng(3).normal(size=(4, *CHW)).astype(np.float32)
    tensor[0, 0, 0, :4] = [1e-30, -3.5e12, 0.0, -0.0]
    rows = [json.dumps(row.tolist()) for row in tensor]  # nested [3][32][32] per row
    data = "[" + rows[0] + "," + ",".join(json.dumps(row.ravel().tolist()) for row in tensor[1:])
    body = tensor_json(data + "]", shape="[4,3,32,32]")
    response = client.post(V2, content=body, headers=JSON_HEADERS)
    assert response.status_code == 200, response.text[:300]
    got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(4, -1)
    np.testing.assert_allclose(got, FakeEngine().reference(tensor), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "data",
    [
        halves(),
        "[[" + halves()[1:-1] + "]]",
        "[" + ",".join(["[1e-3,-2.5E+1,0]"] * (ROW // 3)) + "]",
    ],
    ids=["flat", "nested", "exponents"],
)
def test_well_typed_numbers_still_work(client, data):
    response = client.post(V2, content=tensor_json(data), headers=JSON_HEADERS)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["outputs"][0]["shape"] == [1, 10]


# -- a body of tens of megabytes of numbers ------------------------------------------------

# 3900 rows of 3x32x32 short numbers: 12 M numbers, 60 MB of JSON. Short numbers are the
# worst case for a parser that makes a Python float (32 bytes) of each one.
BIG_ROWS = 3900


def big_body() -> bytes:
    row = ",".join(["0.25,-1.5,0.75"] * (ROW // 3))
    return tensor_json("[" + ",".join([row] * BIG_ROWS) + "]", shape=f"[{BIG_ROWS},3,32,32]")


class PeakRss:
    """The highest resident memory of a process tree, sampled every few milliseconds in a
    thread of its own (a probe that waits on the server would miss the peak)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, tree_rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, tree_rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_big_json_body_parses_off_the_event_loop_in_bounded_memory():
    body = big_body()
    env = {
        "ESCORT_MODELS": FAKE_MODEL,
        "ESCORT_WORKERS": "1",  # one HTTP worker: the liveness probe shares its event loop
        "ESCORT_MAX_REQUEST_BYTES": str(len(body) + 1024),
        "ESCORT_MAX_IMAGES_PER_REQUEST": str(BIG_ROWS),
        "ESCORT_WORKER_SLOTS": str(BIG_ROWS + 64),
        "ESCORT_MAX_QUEUE_SIZE": str(BIG_ROWS + 64),
    }
    with ProcessServer("tests.service.fake_server", env) as server:
        assert server.proc is not None
        with server.client() as warm:  # imports and buffers of a first request
            small = warm.post(V2, content=tensor_json(halves()), headers=JSON_HEADERS)
            assert small.status_code == 200
        outcome: list[httpx.Response | BaseException] = []

        def post() -> None:
            try:
                with httpx.Client(base_url=server.url, timeout=120) as http:
                    outcome.append(http.post(V2, content=body, headers=JSON_HEADERS))
            except BaseException as exc:  # reported by the assertions below
                outcome.append(exc)

        live_s: list[float] = []
        sender = threading.Thread(target=post)
        with PeakRss(server.proc.pid) as memory, server.client() as probe:
            baseline = memory.peak
            sender.start()
            deadline = time.monotonic() + 120
            while sender.is_alive() and time.monotonic() < deadline:
                started = time.perf_counter()
                assert probe.get("/v2/health/live").status_code == 200
                live_s.append(time.perf_counter() - started)
                time.sleep(0.02)
            sender.join(timeout=5)
        assert outcome and isinstance(outcome[0], httpx.Response), outcome
        assert outcome[0].status_code == 200, outcome[0].text[:300]
        assert outcome[0].json()["outputs"][0]["shape"] == [BIG_ROWS, 10]
        assert len(live_s) >= 5, "the request finished before liveness could be probed"
        # The probe shares the worker with the parse, yet is answered meanwhile (the stdlib
        # parser on the event loop held it for seconds).
        assert max(live_s) < 1.0, sorted(live_s)[-5:]
        grown = memory.peak - baseline
        # The body, a copy of its numbers' text and the float32 tensor: a few times the body.
        # A Python float for each number took more than 8 times it.
        assert grown < 4 * len(body), f"RSS grew {grown >> 20} MiB for a {len(body) >> 20} MiB body"
