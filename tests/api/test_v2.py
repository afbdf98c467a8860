"""KServe V2 round trips, checked against the protocol as written (the test encodes and
decodes bodies itself) and against the fake engine's exact answers."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.preprocess import preprocess_image
from tests.service.fakes import FAKE_LABELS, FAKE_MODEL, FAKE_PREPROCESSING, FakeEngine
from tests.v2_bodies import binary_tensor_request, bytes_input, request

INFER = f"/v2/models/{FAKE_MODEL}/infer"


def split_binary_response(response) -> tuple[dict, bytes]:
    length = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:length]), response.content[length:]


def image_truth(engine: FakeEngine, images: list[bytes]) -> np.ndarray:
    batch = np.stack([preprocess_image(i, FAKE_PREPROCESSING, 10**8) for i in images])
    return engine.reference(batch)


def test_server_metadata_and_health(client: TestClient) -> None:
    meta = client.get("/v2").json()
    assert meta["name"] == "escort-serve" and meta["version"]
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    ready = client.get(f"/v2/models/{FAKE_MODEL}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get(f"/v2/models/{FAKE_MODEL}/versions/1/ready").status_code == 200


def test_model_metadata(client: TestClient) -> None:
    meta = client.get(f"/v2/models/{FAKE_MODEL}").json()
    assert meta["name"] == FAKE_MODEL and meta["versions"] == ["1"]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    prep = meta["parameters"]["preprocessing"]
    assert (prep["resize_short_side"], prep["center_crop"]) == (40, 32)
    assert client.get(f"/v2/models/{FAKE_MODEL}/versions/1").json() == meta
    missing = client.get(f"/v2/models/{FAKE_MODEL}/versions/2")
    assert missing.status_code == 404 and "version" in missing.json()["error"]
    config = client.get(f"/v2/models/{FAKE_MODEL}/config").json()
    assert config["max_batch_size"] >= 1
    # Triton's field, in microseconds: the servers of these tests batch for up to 5 ms.
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 5000}
    assert [i["name"] for i in config["input"]] == ["image", "input"]


def test_json_tensor_round_trip(client: TestClient, fake_engine: FakeEngine) -> None:
    rng = np.random.default_rng(1)
    tensor = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    body = {
        "id": "req-42",
        "inputs": [
            {"name": "input", "shape": [3, 3, 32, 32], "datatype": "FP32", "data": tensor.tolist()}
        ],
    }
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    result = response.json()
    assert result["model_name"] == FAKE_MODEL and result["id"] == "req-42"
    assert result["parameters"]["backend"] == "sparse"
    (output,) = result["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    assert output["shape"] == [3, 10]
    got = np.asarray(output["data"], dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, fake_engine.reference(tensor), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["FP32", "FP16"])
def test_binary_tensor_round_trip(client: TestClient, fake_engine: FakeEngine, dtype: str) -> None:
    np_dtype = {"FP32": "<f4", "FP16": "<f2"}[dtype]
    tensor = np.random.default_rng(2).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np_dtype)
    body, headers = binary_tensor_request(tensor, dtype)  # probabilities asked for in binary
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    head, blob = split_binary_response(response)
    (output,) = head["outputs"]
    assert output["shape"] == [2, 10] and "data" not in output
    assert output["parameters"]["binary_data_size"] == len(blob) == 2 * 10 * 4
    got = np.frombuffer(blob, dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(got, fake_engine.reference(tensor.astype(np.float32)), rtol=1e-6)


def test_binary_images_and_binary_data_output(
    client: TestClient, fake_engine: FakeEngine, photos: dict[str, bytes]
) -> None:
    images = [photos["cat.jpg"], photos["astronaut.png"], photos["rocket.jpg"]]
    # No outputs named: tritonclient then sets `binary_data_output` for all of them.
    body, headers = request([bytes_input(images)], output=None, parameters={"backend": "dense"})
    assert b'"binary_data_output":true' in body[: int(headers["Inference-Header-Content-Length"])]
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    head, blob = split_binary_response(response)
    assert head["parameters"]["backend"] == "dense"
    got = np.frombuffer(blob, dtype="<f4").reshape(3, 10)
    np.testing.assert_allclose(got, image_truth(fake_engine, images), rtol=1e-5, atol=1e-7)
    assert fake_engine.calls[-1][1] == "dense"


def test_json_base64_images(
    client: TestClient, fake_engine: FakeEngine, photos: dict[str, bytes]
) -> None:
    image = photos["coffee.jpg"]
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(image).decode()],
            }
        ]
    }
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, image_truth(fake_engine, [image]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("binary", [False, True])
def test_classification_extension(
    client: TestClient, fake_engine: FakeEngine, binary: bool
) -> None:
    tensor = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": tensor.tolist()}
        ],
        "outputs": [
            {"name": "probabilities", "parameters": {"classification": 3, "binary_data": binary}}
        ],
    }
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    if binary:
        head, blob = split_binary_response(response)
        items, offset = [], 0
        while offset < len(blob):
            (length,) = struct.unpack_from("<I", blob, offset)
            items.append(blob[offset + 4 : offset + 4 + length].decode())
            offset += 4 + length
        output = head["outputs"][0]
    else:
        output = response.json()["outputs"][0]
        items = output["data"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    truth = fake_engine.reference(tensor)
    for row in range(2):
        best = np.argsort(-truth[row])[:3]
        for rank, index in enumerate(best):
            score, idx, label = items[row * 3 + rank].split(":")
            assert int(idx) == index and label == FAKE_LABELS[index]
            assert abs(float(score) - truth[row, index]) < 1e-6


def test_classification_larger_than_the_classes_is_clamped(client: TestClient) -> None:
    tensor = np.zeros((1, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 50}}],
    }
    output = client.post(INFER, json=body).json()["outputs"][0]
    assert output["shape"] == [1, 10] and len(output["data"]) == 10


def test_versioned_infer_and_timeout_parameter(client: TestClient) -> None:
    tensor = np.zeros((1, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ],
        "parameters": {"timeout": 5_000_000},  # microseconds, as Triton reads it
    }
    response = client.post(f"/v2/models/{FAKE_MODEL}/versions/1/infer", json=body)
    assert response.status_code == 200, response.text


def test_statistics(client: TestClient) -> None:
    tensor = np.zeros((2, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [2, 3, 32, 32],
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ]
    }
    assert client.post(INFER, json=body).status_code == 200
    (stats,) = client.get(f"/v2/models/{FAKE_MODEL}/stats").json()["model_stats"]
    assert stats["inference_count"] == 2 and stats["execution_count"] == 1
    assert stats["inference_stats"]["success"]["count"] == 1
    assert client.get("/v2/models/stats").json()["model_stats"][0]["name"] == FAKE_MODEL
