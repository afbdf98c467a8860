"""Steps that end with no correct answer say why, on the console and in the report, and stay out
of the plots: against servers that refuse everything, answer too slowly, or stop being ready."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.ops.conftest import Server, run_loadtest

CARD = {"name": "tiny", "backends": ["sparse"], "device": "cpu", "precision": "fp32",
        "max_batch_size": 8, "preprocessing": {"resize": 40, "crop": 32}}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    """Ready at first (mode "unready": only for the load test's first look), then the mode's
    behaviour: "slow" answers every inference after `delay_s`; "unready" refuses it with 503."""

    mode = "slow"
    delay_s = 0.0
    ready_calls = 0

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v2/health/ready":
            type(self).ready_calls += 1
            ready = self.mode != "unready" or self.ready_calls == 1
            self._send(200 if ready else 503, b'{"ready": %s}' % (b"true" if ready else b"false"))
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"models": [CARD]}).encode())
        elif self.path == "/metrics":
            self._send(200, b"", "text/plain; version=0.0.4")
        else:
            self._send(404, b"{}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "unready":
            self._send(503, b'{"error": "not ready"}')
            return
        time.sleep(self.delay_s)
        self._send(200, json.dumps({"results": [{"predictions": [{"label": "x"}]}]}).encode())

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def tiny(request: pytest.FixtureRequest) -> Iterator[str]:
    mode, delay_s = request.param
    handler = type("Handler", (_Handler,), {"mode": mode, "delay_s": delay_s, "ready_calls": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _run(url: str, out: Path, **extra: str):
    env = {"LOADTEST_URL": url, "LOADTEST_USERS": "1", "LOADTEST_PROTOCOLS": "v1",
           "LOADTEST_SETTLE_S": "0", "LOADTEST_OUT": str(out), **extra}  # fmt: skip
    result = run_loadtest(env)
    report = json.loads((out / "report.json").read_text())
    return result, report, (out / "report.md").read_text()


def _assert_no_plots_of_nothing(report: dict, out: Path) -> None:
    assert report["plots"] == []  # no layer data either, here
    for name in ("latency_vs_concurrency.png", "throughput_vs_concurrency.png"):
        assert "no step got a correct answer" in report["plots_omitted"][name]
        assert not (out / name).exists()


@pytest.mark.parametrize("standin", [{"STANDIN_FAIL_EVERY": "1"}], indirect=True)
def test_all_refused(standin: Server, tmp_path: Path) -> None:
    result, report, markdown = _run(standin.url, tmp_path, LOADTEST_DURATION_S="3",
                                    LOADTEST_USERS="1,2")  # fmt: skip
    assert result.returncode == 1, result.stderr  # nothing answered correctly
    for step in report["steps"]:
        reason = step["empty_reason"]
        assert reason == f"all {step['requests']} requests failed (status 503: " \
                         f"{step['requests']}; 0 means no answer)"  # fmt: skip
        assert step["requests"] > 3
        assert f"    no correct answer: {reason}" in result.stderr.splitlines()
        assert f"users): {reason}" in markdown
    first = report["steps"][0]["empty_reason"]
    assert markdown.splitlines()[2] == f"**No step got a correct answer: {first}.**"
    _assert_no_plots_of_nothing(report, tmp_path)


@pytest.mark.parametrize("tiny", [("slow", 4.0)], indirect=True)
def test_answers_slower_than_the_window(tiny: str, tmp_path: Path) -> None:
    result, report, markdown = _run(tiny, tmp_path, LOADTEST_DURATION_S="2",
                                    LOADTEST_TIMEOUT_S="10")  # fmt: skip
    assert result.returncode == 1, result.stderr
    (step,) = report["steps"]
    assert step["requests"] == 0
    assert step["empty_reason"].startswith("no request finished in the ")
    assert "1 still in flight at its end" in step["empty_reason"]
    assert "still in flight at its end" in result.stderr and step["empty_reason"] in markdown
    _assert_no_plots_of_nothing(report, tmp_path)


@pytest.mark.parametrize("tiny", [("unready", 0.0)], indirect=True)
def test_server_no_longer_ready(tiny: str, tmp_path: Path) -> None:
    result, report, markdown = _run(tiny, tmp_path, LOADTEST_DURATION_S="2")
    assert result.returncode == 1, result.stderr
    (step,) = report["steps"]
    reason = step["empty_reason"]
    assert reason.startswith(f"the server was not ready ({tiny}/v2/health/ready answered 503)")
    assert f"all {step['requests']} requests failed (503: {step['requests']})" in reason
    assert f"no correct answer: {reason}" in result.stderr and reason in markdown
