"""v1: multipart and raw-body classification, top_k and backend, and the model cards."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from service.preprocess import preprocess_image
from tests.service.fakes import FAKE_LABELS, FAKE_MODEL, FAKE_PREPROCESSING, FakeEngine

CLASSIFY = f"/v1/models/{FAKE_MODEL}/classify"


def truth(engine: FakeEngine, images: list[bytes]) -> np.ndarray:
    batch = np.stack([preprocess_image(i, FAKE_PREPROCESSING, 10**8) for i in images])
    return engine.reference(batch)


def check_predictions(result: dict, expected: np.ndarray, k: int) -> None:
    predictions = result["predictions"]
    assert len(predictions) == k
    best = np.argsort(-expected)[:k]
    assert [p["index"] for p in predictions] == [int(i) for i in best]
    for p in predictions:
        assert p["label"] == FAKE_LABELS[p["index"]]
        assert abs(p["score"] - float(expected[p["index"]])) < 1e-6


def test_multipart_several_images(
    client: TestClient, fake_engine: FakeEngine, photos: dict[str, bytes]
) -> None:
    names = ["cat.jpg", "coffee.jpg", "astronaut.png"]
    files = [("image", (n, photos[n], "application/octet-stream")) for n in names]
    response = client.post(CLASSIFY, files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == FAKE_MODEL and body["backend"] == "sparse"
    expected = truth(fake_engine, [photos[n] for n in names])
    assert [r["filename"] for r in body["results"]] == names
    for result, row in zip(body["results"], expected, strict=True):
        check_predictions(result, row, 3)


def test_raw_body_and_backend_choice(
    client: TestClient, fake_engine: FakeEngine, photos: dict[str, bytes]
) -> None:
    for content_type in ["image/jpeg", "application/octet-stream"]:
        response = client.post(
            CLASSIFY,
            content=photos["rocket.jpg"],
            headers={"Content-Type": content_type},
            params={"backend": "dense", "top_k": 1},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["backend"] == "dense"
        check_predictions(body["results"][0], truth(fake_engine, [photos["rocket.jpg"]])[0], 1)
    assert fake_engine.calls[-1][1] == "dense"


def test_default_top_k_is_five_and_large_k_is_clamped(
    client: TestClient, photos: dict[str, bytes]
) -> None:
    files = {"image": ("cat.jpg", photos["cat.jpg"])}
    assert len(client.post(CLASSIFY, files=files).json()["results"][0]["predictions"]) == 5
    big = client.post(CLASSIFY, files=files, params={"top_k": 500}).json()
    assert len(big["results"][0]["predictions"]) == len(FAKE_LABELS)


def test_model_cards(client: TestClient) -> None:
    cards = client.get("/v1/models").json()["models"]
    (card,) = cards
    assert card["name"] == FAKE_MODEL and card["ready"] is True
    assert card["backends"] == ["sparse", "dense"] and card["default_backend"] == "sparse"
    assert card["layer_sparsity"] == {"conv1": 0.5, "conv2": 0.9}
    assert card["layers"] == [{"name": "conv1", "sparsity": 0.5}]  # the engine's own card
    assert client.get(f"/v1/models/{FAKE_MODEL}").json() == card
    assert client.get("/v1/models/nope").status_code == 404


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/models/{model}/classify" in paths and "/v2/models/{model}/infer" in paths
