"""Hostile and malformed input over real HTTP: every case is a 4xx with a JSON error, none
reaches the engine, and the server keeps answering good requests in between."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.api.hostile_cases import CASES, LIMIT_BYTES, ONE, V1, V2, tensor_body
from tests.service.fakes import FAKE_MODEL, FakeEngine, encode_image, marked_tensor
from tests.service.servers import ThreadServer

GOOD_MARK = 0.25


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def server(engine: FakeEngine) -> Iterator[ThreadServer]:
    with ThreadServer(
        engine, max_request_bytes=LIMIT_BYTES, max_image_pixels=1_000_000, max_images_per_request=8
    ) as running:
        engine.calls.clear()
        engine.rows_seen.clear()
        yield running


@pytest.fixture(scope="module")
def http(server: ThreadServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def good_request(http: httpx.Client) -> None:
    response = http.post(V2, json=tensor_body(marked_tensor(GOOD_MARK)))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_hostile_input_gets_a_json_4xx(
    http: httpx.Client, photos, method: str, path: str, kwargs, status: int, words: str
) -> None:
    if callable(kwargs):
        kwargs = kwargs(photos)
    response = http.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert words.lower() in body["error"].lower(), body["error"]
    good_request(http)


def test_there_are_at_least_twenty_kinds() -> None:
    assert len({case[0] for case in CASES}) >= 20


def test_no_hostile_input_reached_the_engine(
    http: httpx.Client, engine: FakeEngine, server: ThreadServer
) -> None:
    good_request(http)
    assert engine.rows_seen and set(engine.rows_seen) == {GOOD_MARK}
    metrics = http.get("/metrics").text
    assert 'code="400"' in metrics and 'code="413"' in metrics


def test_api_key(fake_engine: FakeEngine, photos) -> None:
    with ThreadServer(fake_engine, api_key="let-me-in") as server, server.client() as http:
        files = {"image": ("c.jpg", photos["cat.jpg"])}
        for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}]:
            for response in [
                http.post(V1, files=files, headers=headers),
                http.post(V2, json=tensor_body(ONE), headers=headers),
            ]:
                assert response.status_code == 401
                assert response.headers["www-authenticate"] == "Bearer"
                assert "error" in response.json()
        auth = {"Authorization": "Bearer let-me-in"}
        assert http.post(V1, files=files, headers=auth).status_code == 200
        assert http.post(V2, json=tensor_body(ONE), headers=auth).status_code == 200
        # Health, metadata and metrics stay open for probes and scrapers.
        for path in ["/v2/health/ready", f"/v2/models/{FAKE_MODEL}", "/metrics", "/v1/models"]:
            assert http.get(path).status_code == 200


def test_engine_failure_is_a_500_and_the_server_recovers(
    thread_server: ThreadServer, fake_engine: FakeEngine
) -> None:
    with thread_server.client() as http:
        fake_engine.fail = True
        response = http.post(V2, json=tensor_body(ONE))
        assert response.status_code == 500
        assert "simulated device fault" in response.json()["error"]
        fake_engine.fail = False
        assert http.post(V2, json=tensor_body(ONE)).status_code == 200


def test_deadline_is_a_504(fake_engine: FakeEngine) -> None:
    fake_engine.delay_s = 0.5
    with ThreadServer(fake_engine) as server, server.client() as http:
        response = http.post(V2, json=tensor_body(ONE, timeout=100_000))
        assert response.status_code == 504 and "deadline" in response.json()["error"]
    fake_engine.delay_s = 0.0
    fake_engine.delay_s = 0.3
    with ThreadServer(fake_engine, request_timeout_s=0.1) as server, server.client() as http:
        buffer = io.BytesIO(encode_image(Image.new("RGB", (40, 40))))
        response = http.post(V1, files={"image": ("a.png", buffer)})
        assert response.status_code == 504
