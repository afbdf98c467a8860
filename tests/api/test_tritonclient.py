"""The real Triton HTTP client, with its default settings, against a real server."""

from __future__ import annotations

import numpy as np
import pytest

from service.preprocess import preprocess_image
from tests.service.fakes import FAKE_LABELS, FAKE_MODEL, FAKE_PREPROCESSING, FakeEngine
from tests.service.servers import ThreadServer

httpclient = pytest.importorskip("tritonclient.http")
utils = pytest.importorskip("tritonclient.utils")


@pytest.fixture
def triton(thread_server: ThreadServer):
    client = httpclient.InferenceServerClient(
        thread_server.url.removeprefix("http://"), connection_timeout=10, network_timeout=30
    )
    yield client
    client.close()


def test_health_and_metadata(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(FAKE_MODEL)
    assert not triton.is_model_ready("no-such-model")
    meta = triton.get_model_metadata(FAKE_MODEL)
    assert {i["name"] for i in meta["inputs"]} == {"image", "input"}
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    assert triton.get_model_config(FAKE_MODEL)["name"] == FAKE_MODEL
    assert triton.get_inference_statistics(FAKE_MODEL)["model_stats"][0]["name"] == FAKE_MODEL


def test_tensor_infer_with_defaults(triton, fake_engine: FakeEngine) -> None:
    tensor = np.random.default_rng(4).normal(size=(4, 3, 32, 32)).astype(np.float32)
    inputs = [httpclient.InferInput("input", list(tensor.shape), "FP32")]
    inputs[0].set_data_from_numpy(tensor)  # binary by default
    result = triton.infer(FAKE_MODEL, inputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), fake_engine.reference(tensor), rtol=1e-6
    )


def test_fp16_json_input_and_json_output(triton, fake_engine: FakeEngine) -> None:
    tensor = np.random.default_rng(5).normal(size=(1, 3, 32, 32)).astype(np.float16)
    inputs = [httpclient.InferInput("input", list(tensor.shape), "FP16")]
    inputs[0].set_data_from_numpy(tensor, binary_data=True)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = triton.infer(FAKE_MODEL, inputs, outputs=outputs)
    expected = fake_engine.reference(tensor.astype(np.float32))
    np.testing.assert_allclose(result.as_numpy("probabilities").reshape(1, 10), expected, rtol=1e-5)


def test_image_bytes_with_classification(
    triton, fake_engine: FakeEngine, photos: dict[str, bytes]
) -> None:
    images = [photos["cat.jpg"], photos["coffee.jpg"]]
    inputs = [httpclient.InferInput("image", [2], "BYTES")]
    inputs[0].set_data_from_numpy(np.array(images, dtype=np.object_))
    outputs = [httpclient.InferRequestedOutput("probabilities", class_count=2)]
    result = triton.infer(FAKE_MODEL, inputs, outputs=outputs, parameters={"backend": "dense"})
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 2)
    batch = np.stack([preprocess_image(i, FAKE_PREPROCESSING, 10**8) for i in images])
    truth = fake_engine.reference(batch)
    for row in range(2):
        score, index, label = top[row, 0].decode().split(":")
        assert int(index) == int(np.argmax(truth[row])) and label == FAKE_LABELS[int(index)]


def test_errors_reach_the_client(triton) -> None:
    inputs = [httpclient.InferInput("input", [1, 3, 8, 8], "FP32")]
    inputs[0].set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(utils.InferenceServerException, match="shape"):
        triton.infer(FAKE_MODEL, inputs)
    with pytest.raises(utils.InferenceServerException, match="unknown model"):
        triton.infer("no-such-model", inputs)
