"""The process layout on a GPU: the real engine in the engine process, rows DMA'd straight
from the workers' page-locked arenas. Whatever the batching, each answer must be the one its
own row gets alone, and FP16 rows must match FP32 rows of the same values."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.core.test_layout import probabilities
from tests.service.servers import ProcessServer
from tests.v2_bodies import binary_tensor_request, tensor_body

pytestmark = pytest.mark.gpu

MODEL = "resnet50-uniform90"
V2 = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def server():
    env = {
        "ESCORT_MODELS": MODEL,
        "ESCORT_BACKENDS": "sparse",
        "ESCORT_DEVICE": "cuda",
        "ESCORT_WORKERS": "3",
        "ESCORT_MAX_BATCH_SIZE": "8",
        "ESCORT_MAX_BATCH_DELAY_MS": "20",
        "ESCORT_CACHE_DIR": os.environ.get("ESCORT_CACHE_DIR", "/tmp/escort-cache"),
    }
    with ProcessServer("service.app", env, ready_timeout_s=400) as running:
        yield running


def rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 3, 224, 224)).astype(np.float32)


def test_batched_answers_equal_single_answers(server: ProcessServer) -> None:
    inputs = rows(16, seed=1)
    with server.client() as http:
        alone = [probabilities(http.post(V2, json=tensor_body(x[None]))) for x in inputs]
    with ThreadPoolExecutor(16) as pool:

        def one(x: np.ndarray) -> np.ndarray:
            with server.client() as http:  # a connection each: spread over the workers
                response = http.post(V2, json=tensor_body(x[None]))
                assert response.status_code == 200, response.text
                return probabilities(response)

        together = list(pool.map(one, inputs))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_fp16_rows_match_fp32_rows_of_the_same_values(server: ProcessServer) -> None:
    half = rows(4, seed=2).astype(np.float16)
    body, headers = binary_tensor_request(half, "FP16", binary_output=False)
    with server.client() as http:
        response = http.post(V2, content=body, headers=headers)
        assert response.status_code == 200, response.text
        from_half = probabilities(response)
        from_full = probabilities(http.post(V2, json=tensor_body(half.astype(np.float32))))
    np.testing.assert_allclose(from_half, from_full, rtol=1e-4, atol=1e-6)
