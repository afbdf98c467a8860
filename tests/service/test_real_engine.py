"""The service with the real engine: efficientnet-lite0 on the CPU in a server process,
classifying real photographs through v1 and V2, with per-layer metrics flowing."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.servers import ProcessServer

pytest.importorskip("torch")
engine_package = pytest.importorskip("service.engine")
if not hasattr(engine_package, "load_engine"):
    pytest.skip("service.engine.load_engine is not there yet", allow_module_level=True)

MODEL = "efficientnet-lite0"
EXPECTED = {
    "cat.jpg": {"tabby", "tiger cat", "Egyptian cat"},
    "coffee.jpg": {"espresso", "cup"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_server() -> Iterator[ProcessServer]:
    env = {
        "ESCORT_MODELS": MODEL,
        "ESCORT_DEVICE": "cpu",
        "ESCORT_LAYER_PROFILE_EVERY": "1",
        "ESCORT_MAX_BATCH_DELAY_MS": "20",
        "ESCORT_REQUEST_TIMEOUT_S": "300",
    }
    with ProcessServer("service.app", env, ready_timeout_s=480) as server:
        yield server


@pytest.fixture(scope="module")
def http(real_server: ProcessServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_server.url, timeout=300) as client:
        yield client


def test_v1_classifies_the_photos(http: httpx.Client, photos: dict[str, bytes]) -> None:
    files = [("image", (name, photos[name], "image/jpeg")) for name in EXPECTED]
    response = http.post(f"/v1/models/{MODEL}/classify", files=files, params={"top_k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    for result in body["results"]:
        top1 = result["predictions"][0]
        assert top1["label"] in EXPECTED[result["filename"]], result
        scores = [p["score"] for p in result["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1


def test_raw_body_like_curl(http: httpx.Client, photos: dict[str, bytes]) -> None:
    response = http.post(
        f"/v1/models/{MODEL}/classify",
        content=photos["cat.jpg"],
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["predictions"][0]["label"] in EXPECTED["cat.jpg"]


def test_v2_classification_extension(http: httpx.Client, photos: dict[str, bytes]) -> None:
    body = {
        "id": "coffee",
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(photos["coffee.jpg"]).decode()],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["id"] == "coffee"
    score, index, label = result["outputs"][0]["data"][0].split(":", 2)
    assert label in EXPECTED["coffee.jpg"] and float(score) > 0.1 and int(index) < 1000


def test_metadata_cards_and_layer_metrics(http: httpx.Client, photos: dict[str, bytes]) -> None:
    meta = http.get(f"/v2/models/{MODEL}").json()
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]} in meta["inputs"]
    assert meta["outputs"][0]["shape"] == [-1, 1000]
    (card,) = http.get("/v1/models").json()["models"]
    assert card["name"] == MODEL and card["layer_sparsity"]
    files = {"image": ("rocket.jpg", photos["rocket.jpg"])}
    assert http.post(f"/v1/models/{MODEL}/classify", files=files).status_code == 200
    text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    layers = families["escort_layer_duration_seconds"].samples
    assert any(s.labels.get("model") == MODEL and s.name.endswith("_count") for s in layers)
    sparsity = [s.value for s in families["escort_layer_sparsity"].samples]
    assert sparsity and max(sparsity) >= 0.29 and min(sparsity) >= 0.0
    ready = [s.value for s in families["escort_model_ready"].samples]
    assert ready == [1.0]
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_sigterm_exits_cleanly(real_server: ProcessServer) -> None:
    real_server.terminate()
    assert real_server.wait(120) == 0, real_server.output()[-3000:]


def test_an_unknown_model_stops_the_server_with_exit_code_1() -> None:
    server = ProcessServer("service.app", {"ESCORT_MODELS": "no-such-net"}).start()
    try:
        assert server.wait(120) == 1
        assert "unknown model 'no-such-net'" in server.output()
        assert "efficientnet-lite0" in server.output()  # the message lists the manifests
    finally:
        server.__exit__()
