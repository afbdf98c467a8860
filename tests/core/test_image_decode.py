"""ESCORT_IMAGE_DECODE=engine on a real server (efficientnet-lite0 on the CPU): photos travel
encoded to the engine process, which decodes them batched on its device; the answers match
the workers' Pillow path, a photo that does not decode is that request's 400, and what the
engine cannot decode (a PNG, a rotated JPEG) still works through the workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.service.fakes import encode_image
from tests.service.servers import ProcessServer

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = "efficientnet-lite0"
V1 = f"/v1/models/{MODEL}/classify"


def _env(decode: str, tmp: Path) -> dict[str, str]:
    return {
        "ESCORT_MODELS": MODEL,
        "ESCORT_BACKEND": "dense",
        "ESCORT_DEVICE": "cpu",
        "ESCORT_IMAGE_DECODE": decode,
        "ESCORT_MAX_BATCH_DELAY_MS": "20",
        "ESCORT_CACHE_DIR": str(tmp / "cache"),
    }


def _preprocessed(metrics: str) -> float:
    """Images the HTTP workers decoded (the engine's own decode is not counted there)."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "escort_preprocess_duration_seconds_count":
                return sample.value
    return 0.0


def _top(response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [
        [(p["label"], p["score"]) for p in result["predictions"]]
        for result in response.json()["results"]
    ]


@pytest.mark.slow
def test_engine_decode_answers_like_the_workers(tmp_path: Path) -> None:
    photos = [("image", (name, (DATA / name).read_bytes())) for name in ("cat.jpg", "coffee.jpg")]
    answers = {}
    for decode in ("workers", "engine"):
        server = ProcessServer("service.app", _env(decode, tmp_path), ready_timeout_s=300)
        with server, server.client() as http:
            answers[decode] = _top(http.post(V1, files=photos, params={"top_k": 3}))
            decoded_here = _preprocessed(http.get("/metrics").text)
            if decode == "workers":
                assert decoded_here == 2
                continue
            assert decoded_here == 0  # both photos went to the engine encoded
            broken = (DATA / "cat.jpg").read_bytes()[:15000]
            response = http.post(V1, files=[photos[0], ("image", ("broken.jpg", broken))])
            assert response.status_code == 400
            assert "image 2" in response.json()["error"]
            png = encode_image(Image.open(DATA / "rocket.jpg"), "PNG")
            assert _top(http.post(V1, files=[("image", ("r.png", png))]))[0]
            assert _preprocessed(http.get("/metrics").text) == 1  # the PNG: the workers' path
            engine_server_output = server.output()
    assert "Traceback" not in engine_server_output
    for workers, engine in zip(answers["workers"], answers["engine"], strict=True):
        assert workers[0][0] == engine[0][0]  # the same top-1 label
        assert np.isclose(workers[0][1], engine[0][1], atol=0.05)
    assert answers["engine"][0][0][0] == "tiger cat"
    assert answers["engine"][1][0][0] == "espresso"
