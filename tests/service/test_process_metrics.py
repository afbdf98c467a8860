"""escort_process_*: resident memory, CPU time and open fds of the engine core process and of the
HTTP workers, which prometheus_client's multiprocess mode does not export on its own. Read
from /proc, so Linux only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ServiceMetrics, read_process_stats
from tests.service.fakes import FAKE_MODEL
from tests.service.servers import ProcessServer

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process metrics read /proc"
)
WORKERS = 2
MIB = 2**20
GIB = 2**30


def samples(text: str) -> dict[tuple[str, str], float]:
    """(series name, role) -> value, for the escort_process* series."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("escort_process"):
                out[(sample.name, sample.labels.get("role", ""))] = sample.value
    return out


def test_read_process_stats_matches_this_process() -> None:
    stats = read_process_stats()
    assert stats is not None
    assert 10 * MIB < stats.resident_bytes < 64 * GIB  # a Python with numpy, not a toy number
    times = os.times()
    assert stats.cpu_seconds == pytest.approx(times.user + times.system, abs=0.5)
    assert stats.open_fds >= 3  # stdin, stdout, stderr at least


def test_one_process_reports_as_a_worker_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = ServiceMetrics()
    metrics.refresh_process("engine")  # in one process the worker role covers it
    metrics.refresh_process("worker")
    sum(i * i for i in range(300_000))  # burn a little CPU between refreshes
    metrics.refresh_process("worker")
    found = samples(metrics.render()[0].decode())
    assert found[("escort_processes", "worker")] == 1
    assert ("escort_processes", "engine") not in found
    assert found[("escort_process_resident_memory_bytes", "worker")] > 10 * MIB
    cpu = found[("escort_process_cpu_seconds_total", "worker")]
    times = os.times()
    assert 0 < cpu <= times.user + times.system + 0.1  # deltas add up to the process's total
    with pytest.raises(ValueError):
        metrics.refresh_process("supervisor")


@pytest.fixture(scope="module")
def server():
    env = {
        "ESCORT_MODELS": FAKE_MODEL,
        "ESCORT_BACKENDS": "sparse",
        "ESCORT_WORKERS": str(WORKERS),
        "ESCORT_WORKER_SLOTS": "8",
    }
    with ProcessServer("tests.service.fake_server", env) as running:
        yield running


def _scrape_until_every_process_reports(server: ProcessServer, timeout_s: float = 15) -> str:
    # The engine refreshes every couple of seconds, idle workers on a timer of their own: wait
    # until both roles are complete rather than racing the first refresh.
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        with server.client() as http:
            text = http.get("/metrics").text
        found = samples(text)
        counts = (
            found.get(("escort_processes", "engine")),
            found.get(("escort_processes", "worker")),
        )
        if counts == (1, WORKERS):
            return text
        time.sleep(0.3)
    raise AssertionError(f"not every process reports after {timeout_s} s: {samples(text)}")


def test_engine_and_workers_report_plausible_values(server: ProcessServer) -> None:
    found = samples(_scrape_until_every_process_reports(server))
    for role, processes in (("engine", 1), ("worker", WORKERS)):
        rss = found[("escort_process_resident_memory_bytes", role)]
        # Each process imports the service (FastAPI, numpy); none should be near a host's RAM.
        assert processes * 20 * MIB < rss < processes * 16 * GIB, (role, rss)
        assert found[("escort_process_cpu_seconds_total", role)] > 0, role
        # Every worker holds the shared listener, a pipe and its slot arena at least.
        assert found[("escort_process_open_fds", role)] >= processes * 4, role
    # Counters only go up, whichever worker answers the scrape.
    before = found[("escort_process_cpu_seconds_total", "worker")]
    time.sleep(2.5)
    after = samples(_scrape_until_every_process_reports(server))
    assert after[("escort_process_cpu_seconds_total", "worker")] >= before
    assert after[("escort_process_cpu_seconds_total", "engine")] > 0


def test_promtool_is_clean_with_the_process_metrics(server: ProcessServer) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    text = _scrape_until_every_process_reports(server)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert not result.stdout.strip() and not result.stderr.strip(), result.stdout.decode()
