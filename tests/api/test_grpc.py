"""KServe V2 over gRPC, driven by tritonclient.grpc against a real server (the supervisor, the
engine process with the fake engine, two HTTP workers), beside REST on the same server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
from tests.service.servers import ProcessServer

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = "grpc-test-key"


def auth() -> dict[str, str]:
    # A fresh dict each call: tritonclient.http adds its own headers to the one it is given.
    return {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    env = {
        "ESCORT_MODELS": FAKE_MODEL,
        "ESCORT_BACKENDS": "sparse,dense",
        "ESCORT_WORKERS": "2",
        "ESCORT_API_KEY": KEY,
        "ESCORT_MAX_BATCH_DELAY_MS": "5",
    }
    with ProcessServer("tests.service.fake_server", env) as running:
        yield running


@pytest.fixture()
def client(server: ProcessServer):
    with triton_grpc.InferenceServerClient(server.grpc_url) as grpc_client:
        yield grpc_client


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def tensor_input(batch: np.ndarray) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return tensor


def image_input(*images: bytes) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def infer_in_background(url: str, mark: float, results: dict, key: str) -> threading.Thread:
    """A started thread that sends one gRPC infer and keeps its probabilities in results[key]."""

    def send() -> None:
        with triton_grpc.InferenceServerClient(url) as grpc_client:
            results[key] = grpc_client.infer(
                FAKE_MODEL, [tensor_input(marked_tensor(mark))]
            ).as_numpy("probabilities")

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def status_of(call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value.status()


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(FAKE_MODEL) and client.is_model_ready(FAKE_MODEL, "1")
    server = client.get_server_metadata()
    assert server.name == "escort-serve" and "classification" in server.extensions
    model = client.get_model_metadata(FAKE_MODEL)
    assert model.name == FAKE_MODEL and list(model.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in model.inputs}
    assert inputs == {"image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, 32, 32])}
    assert [(t.name, t.datatype) for t in model.outputs] == [("probabilities", "FP32")]


def test_unknown_models_and_versions_are_not_found(client) -> None:
    assert status_of(client.get_model_metadata, "no-such-model") == "StatusCode.NOT_FOUND"
    assert status_of(client.get_model_metadata, FAKE_MODEL, "7") == "StatusCode.NOT_FOUND"
    batch = marked_tensor(0.2)
    code = status_of(client.infer, "no-such-model", [tensor_input(batch)], headers=auth())
    assert code == "StatusCode.NOT_FOUND"


def test_a_tensor_batch_matches_the_engine_and_rest(client, server: ProcessServer) -> None:
    batch = np.concatenate([marked_tensor(m) for m in (0.1, 0.5, 0.9)])
    result = client.infer(FAKE_MODEL, [tensor_input(batch)], headers=auth())
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities, FakeEngine().reference(batch), rtol=1e-6)
    assert result.get_response().parameters["backend"].string_param == "sparse"
    with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as rest:
        tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=True)
        over_rest = rest.infer(FAKE_MODEL, [tensor], headers=auth()).as_numpy("probabilities")
    np.testing.assert_array_equal(probabilities, over_rest)


def test_images_and_classification_match_rest(client, server: ProcessServer) -> None:
    photos = [(DATA / name).read_bytes() for name in ("cat.jpg", "rocket.jpg")]
    wanted = [triton_grpc.InferRequestedOutput("probabilities", class_count=3)]
    result = client.infer(FAKE_MODEL, [image_input(*photos)], outputs=wanted, headers=auth())
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    probabilities = client.infer(FAKE_MODEL, [image_input(*photos)], headers=auth())
    probabilities = probabilities.as_numpy("probabilities")
    with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as rest:
        tensor = triton_http.InferInput("image", [2], "BYTES")
        tensor.set_data_from_numpy(np.array(photos, dtype=np.object_), binary_data=True)
        rest_top = rest.infer(
            FAKE_MODEL, [tensor], outputs=[triton_http.InferRequestedOutput(
                "probabilities", binary_data=True, class_count=3)], headers=auth(),
        ).as_numpy("probabilities")  # fmt: skip
    np.testing.assert_array_equal(top, rest_top)
    # "score:index:label", best first, the index the row's largest probability.
    for row, entries in zip(probabilities, top, strict=True):
        score, index, label = entries[0].decode().split(":")
        assert int(index) == int(np.argmax(row)) and label == f"class-{index}"
        assert float(score) == pytest.approx(float(row.max()), abs=1e-6)


def test_typed_contents_and_the_raw_form_agree(server: ProcessServer) -> None:
    batch = marked_tensor(0.7, rows=2)
    typed = pb.ModelInferRequest(model_name=FAKE_MODEL)
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(typed, metadata=tuple(auth().items()))
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(got, FakeEngine().reference(batch), rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "datatype"),
    [([1, 3, 16, 16], "FP32"), ([1, 3, 32, 32], "INT32"), ([3, 32, 32], "FP32")],
)
def test_a_malformed_tensor_is_an_invalid_argument(client, shape, datatype) -> None:
    tensor = triton_grpc.InferInput("input", shape, datatype)
    dtype = np.int32 if datatype == "INT32" else np.float32
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    code = status_of(client.infer, FAKE_MODEL, [tensor], headers=auth())
    assert code == "StatusCode.INVALID_ARGUMENT"


def test_a_tensor_with_nan_or_a_wrong_input_name_is_refused(client) -> None:
    bad = marked_tensor(0.1)
    bad[0, 0, 0, 0] = np.nan
    assert status_of(client.infer, FAKE_MODEL, [tensor_input(bad)], headers=auth()) == (
        "StatusCode.INVALID_ARGUMENT"
    )
    other = triton_grpc.InferInput("pixels", [1, 3, 32, 32], "FP32")
    other.set_data_from_numpy(marked_tensor(0.1))
    assert status_of(client.infer, FAKE_MODEL, [other], headers=auth()) == (
        "StatusCode.INVALID_ARGUMENT"
    )


def test_the_api_key_is_required(client) -> None:
    batch = [tensor_input(marked_tensor(0.3))]
    assert status_of(client.infer, FAKE_MODEL, batch) == "StatusCode.UNAUTHENTICATED"
    wrong = {"authorization": "Bearer nope"}
    assert status_of(client.infer, FAKE_MODEL, batch, headers=wrong) == (
        "StatusCode.UNAUTHENTICATED"
    )
    assert client.infer(FAKE_MODEL, batch, headers=auth()).as_numpy("probabilities").shape == (
        1,
        10,
    )
    # Health and metadata stay open, as over REST.
    assert client.is_server_ready()


def test_grpc_and_rest_share_a_batch_and_the_metrics(server: ProcessServer) -> None:
    env = dict(server.env, ESCORT_MAX_BATCH_DELAY_MS="400", ESCORT_BACKENDS="sparse")
    env.pop("ESCORT_API_KEY")
    with ProcessServer("tests.service.fake_server", {k: env[k] for k in env if k.startswith(
            "ESCORT_") and k not in ("ESCORT_PORT", "ESCORT_GRPC_PORT", "ESCORT_HOST")}) as alone:  # fmt: skip
        with httpx.Client(base_url=alone.url, timeout=30) as http:
            before = http.get("/metrics").text
        results: dict[str, np.ndarray] = {}
        thread = infer_in_background(alone.grpc_url, 0.4, results, "grpc")
        time.sleep(0.1)  # inside the first request's 400 ms batch window
        with triton_http.InferenceServerClient(alone.url.removeprefix("http://")) as rest:
            tensor = triton_http.InferInput("input", [1, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(marked_tensor(0.4), binary_data=True)
            results["rest"] = rest.infer(FAKE_MODEL, [tensor]).as_numpy("probabilities")
        thread.join(30)
        with httpx.Client(base_url=alone.url, timeout=30) as http:
            after = http.get("/metrics").text
    np.testing.assert_array_equal(results["grpc"], results["rest"])
    batches = total(after, "escort_batch_size_count") - total(before, "escort_batch_size_count")
    images = total(after, "escort_batch_size_sum") - total(before, "escort_batch_size_sum")
    assert (batches, images) == (1, 2)  # one batch held both requests' rows
    for protocol in ("grpc", "v2"):
        assert total(after, "escort_requests_total", protocol=protocol, code="200") == 1


def test_the_grpc_deadline_bounds_the_request() -> None:
    env = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_WORKERS": "1", "FAKE_DELAY_S": "1.0"}
    with ProcessServer("tests.service.fake_server", env) as slow:
        with triton_grpc.InferenceServerClient(slow.grpc_url) as grpc_client:
            started = time.monotonic()
            code = status_of(
                grpc_client.infer, FAKE_MODEL, [tensor_input(marked_tensor(0.1))],
                client_timeout=0.3,
            )  # fmt: skip
            assert code == "StatusCode.DEADLINE_EXCEEDED"
            assert time.monotonic() - started < 0.9
            time.sleep(1.5)  # the batch that held the row has finished
            with httpx.Client(base_url=slow.url, timeout=30) as http:
                text = http.get("/metrics").text
        # Counted as a deadline or a client that left, never as a server error.
        codes = {
            sample.labels["code"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "escort_requests_total" and sample.labels["protocol"] == "grpc"
        }
        assert codes and codes <= {"504", "499"}, codes


def test_sigterm_finishes_grpc_work_in_flight_and_refuses_new_work() -> None:
    env = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_WORKERS": "1", "FAKE_DELAY_S": "0.6",
           "ESCORT_MAX_BATCH_SIZE": "1"}  # fmt: skip
    with ProcessServer("tests.service.fake_server", env) as draining:
        results: dict[str, np.ndarray] = {}
        thread = infer_in_background(draining.grpc_url, 0.2, results, "first")
        time.sleep(0.3)
        draining.terminate()
        time.sleep(0.1)
        with triton_grpc.InferenceServerClient(draining.grpc_url) as grpc_client:
            late = status_of(grpc_client.infer, FAKE_MODEL, [tensor_input(marked_tensor(0.3))])
        thread.join(30)
        assert late == "StatusCode.UNAVAILABLE"
        np.testing.assert_allclose(
            results["first"], FakeEngine().reference(marked_tensor(0.2)), rtol=1e-6
        )
        assert draining.wait(60) == 0, draining.output()


def test_grpc_can_be_turned_off_and_a_taken_port_is_a_clear_error() -> None:
    env = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_WORKERS": "1", "ESCORT_GRPC": "false"}
    with ProcessServer("tests.service.fake_server", env) as plain:
        with triton_grpc.InferenceServerClient(plain.grpc_url) as grpc_client:
            assert status_of(grpc_client.is_server_live) == "StatusCode.UNAVAILABLE"
        # Its HTTP port is taken now: a second server given it as the gRPC port stops at once.
        taken = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_WORKERS": "1",
                 "ESCORT_GRPC_PORT": str(plain.port)}  # fmt: skip
        second = ProcessServer("tests.service.fake_server", taken).start()
        try:
            assert second.wait(60) == 1
            assert f"cannot listen on 127.0.0.1:{plain.port}" in second.output()
            assert "ESCORT_GRPC_PORT" in second.output()
        finally:
            second.__exit__(None, None, None)
