"""Readiness, overload, batching under concurrency, client disconnects and the SIGTERM drain,
over real HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
from tests.service.servers import ProcessServer, ThreadServer, make_settings, wait_ready
from tests.v2_bodies import tensor_body

V2 = f"/v2/models/{FAKE_MODEL}/infer"


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                samples[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def metric_value(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for key, value in metric_samples(text, name).items()
        if all((k, v) in key for k, v in labels.items())
    )


class SlowWarmEngine(FakeEngine):
    def warmup(self, model: str, backend: str) -> None:
        time.sleep(0.4)


def test_not_ready_until_warmed() -> None:
    app = create_app(make_settings(), engine=SlowWarmEngine())
    with TestClient(app, raise_server_exceptions=False) as client:
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "loading" in ready.json()["error"]
        assert client.get("/v2/health/live").status_code == 200
        assert client.get(f"/v2/models/{FAKE_MODEL}/ready").status_code == 503
        early = client.post(V2, json=tensor_body(marked_tensor(0.1)))
        assert early.status_code == 503 and early.headers["Retry-After"] == "1"
        assert "error" in early.json()
        wait_ready(client.get)
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "escort_model_ready", model=FAKE_MODEL) == 1
        assert client.post(V2, json=tensor_body(marked_tensor(0.1))).status_code == 200


def test_a_failed_load_is_reported() -> None:
    def broken_loader(settings, metrics):
        raise FileNotFoundError("models/missing-net.yaml")

    app = create_app(make_settings(models=("missing-net",)), engine_factory=broken_loader)
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(100):
            ready = client.get("/v2/health/ready")
            if "failed" in ready.json().get("error", ""):
                break
            time.sleep(0.02)
        assert ready.status_code == 503
        assert "missing-net.yaml" in ready.json()["error"]
        assert client.post("/v2/models/missing-net/infer", json={}).status_code == 404


def test_batches_form_under_concurrency(fake_engine: FakeEngine) -> None:
    fake_engine.delay_s = 0.05
    server = ThreadServer(fake_engine, max_batch_size=8, max_batch_delay_ms=20)
    with server, server.client() as http, ThreadPoolExecutor(32) as pool:
        bodies = [tensor_body(marked_tensor(i / 100)) for i in range(48)]
        responses = list(pool.map(lambda b: http.post(V2, json=b), bodies))
        assert all(r.status_code == 200 for r in responses)
        for body, response in zip(bodies, responses, strict=True):
            tensor = np.asarray(body["inputs"][0]["data"], dtype=np.float32)
            expected = fake_engine.reference(tensor.reshape(1, 3, 32, 32))
            got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(got, expected.ravel(), rtol=1e-6)
        text = http.get("/metrics").text
    labels = {"model": FAKE_MODEL, "backend": "sparse"}
    count = metric_value(text, "escort_batch_size_count", **labels)
    total = metric_value(text, "escort_batch_size_sum", **labels)
    singles = metric_value(text, "escort_batch_size_bucket", le="1.0", **labels)
    assert total == 48
    assert count < 48 and total / count >= 2.0, (count, total)  # mean batch size
    assert singles < count  # some batches held more than one image
    buckets = {
        dict(key)["le"]
        for key in metric_samples(text, "escort_batch_size_bucket")
        if dict(key)["model"] == FAKE_MODEL
    }
    assert {"1.0", "2.0", "4.0", "8.0", "+Inf"} <= buckets


def test_overload_answers_every_request(fake_engine: FakeEngine) -> None:
    fake_engine.delay_s = 0.1
    with (
        ThreadServer(fake_engine, max_batch_size=2, max_queue_size=4, retry_after_s=3) as server,
        server.client() as http,
        ThreadPoolExecutor(24) as pool,
    ):
        bodies = [tensor_body(marked_tensor(0.3)) for _ in range(24)]
        responses = list(pool.map(lambda b: http.post(V2, json=b), bodies))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
        for response in responses:
            if response.status_code == 503:
                assert response.headers["Retry-After"] == "3"
                assert "queue" in response.json()["error"]
        text = http.get("/metrics").text
        rejected = metric_value(text, "escort_rejected_total", reason="queue_full")
        assert rejected == codes.count(503)
        answered = metric_value(text, "escort_requests_total", code="503", protocol="v2")
        assert answered == codes.count(503)


def test_a_disconnected_client_is_never_computed(fake_engine: FakeEngine) -> None:
    with ThreadServer(fake_engine, max_batch_size=1) as server:
        fake_engine.gate = threading.Event()  # from here on, batches wait for the test
        fake_engine.started.clear()
        with server.client() as http, ThreadPoolExecutor(2) as pool:
            blocker = pool.submit(http.post, V2, json=tensor_body(marked_tensor(0.5)))
            assert fake_engine.started.wait(10)
            impatient = httpx.Client(base_url=server.url, timeout=0.5)
            with impatient, pytest.raises(httpx.ReadTimeout):
                impatient.post(V2, json=tensor_body(marked_tensor(9.0)))
            # Wait until the server has noticed the disconnect, then let the engine go.
            for _ in range(100):
                text = http.get("/metrics").text
                if metric_value(text, "escort_rejected_total", reason="client_disconnected"):
                    break
                time.sleep(0.05)
            fake_engine.gate.set()
            assert blocker.result(timeout=30).status_code == 200
            assert http.post(V2, json=tensor_body(marked_tensor(0.7))).status_code == 200
            assert metric_value(text, "escort_rejected_total", reason="client_disconnected") == 1
            assert 9.0 not in fake_engine.rows_seen
            assert metric_value(http.get("/metrics").text, "escort_requests_total", code="499") == 1


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests() -> None:
    env = {
        "ESCORT_MODELS": FAKE_MODEL,
        "ESCORT_BACKENDS": "sparse",
        "ESCORT_MAX_BATCH_SIZE": "2",
        "ESCORT_DRAIN_TIMEOUT_S": "20",
        "FAKE_DELAY_S": "0.3",
    }
    with ProcessServer("tests.service.fake_server", env) as server:
        with server.client() as http, ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(http.post, V2, json=tensor_body(marked_tensor(i / 10)))
                for i in range(8)
            ]
            for _ in range(200):  # until all eight are in flight
                text = http.get("/metrics").text
                if metric_value(text, "escort_inflight_requests") >= 8:
                    break
                time.sleep(0.02)
            assert metric_value(text, "escort_inflight_requests") >= 8
            server.terminate()
            time.sleep(0.2)
            ready = http.get("/v2/health/ready")
            assert ready.status_code == 503 and "shutting down" in ready.json()["error"]
            late = http.post(V2, json=tensor_body(marked_tensor(0.9)))
            assert late.status_code == 503 and "Retry-After" in late.headers
            responses = [f.result(timeout=30) for f in futures]
            assert [r.status_code for r in responses] == [200] * 8
        assert server.wait(30) == 0, server.output()
