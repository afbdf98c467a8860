"""The model repository API (index, load, unload) over REST and gRPC, driven by tritonclient
against a real server (the supervisor, the engine process with the fake engine, three HTTP
workers): a model loaded through one worker is served by all of them; an unload lets the
model's queued requests finish and then answers 404."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
from tests.service.servers import ProcessServer, wait_metric
from tests.v2_bodies import tensor_body

ROOT = Path(__file__).resolve().parents[2]
KEY = "repo-key"
OTHER = "fake-net-b"


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    # A manifest for the second fake model, so that the name is one the models folders hold
    # (the fake engine builds its own model from the name).
    folder = tmp_path_factory.mktemp("models")
    for name in (OTHER, f"{FAKE_MODEL}@2"):
        shutil.copy(ROOT / "models" / "resnet50-uniform90.toml", folder / f"{name}.toml")
    return folder


def _env(models_dir: Path, **extra: str) -> dict[str, str]:
    return {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_BACKENDS": "sparse", "ESCORT_WORKERS": "3",
            "ESCORT_REPOSITORY_API": "true", "ESCORT_API_KEY": KEY,
            "ESCORT_MODELS_DIR": str(models_dir), **extra}  # fmt: skip


@pytest.fixture(scope="module")
def server(models_dir: Path):
    with ProcessServer("tests.service.fake_server", _env(models_dir)) as running:
        yield running


def _rest(server: ProcessServer) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(server.url.removeprefix("http://"))


def _infer_status(server: ProcessServer, model: str) -> int:
    # A new connection each time: across several of them, every worker answers some.
    with httpx.Client(base_url=server.url, timeout=30, headers=auth()) as http:
        return http.post(
            f"/v2/models/{model}/infer", json=tensor_body(marked_tensor(0.3))
        ).status_code


def _index(client) -> dict[str, str]:
    """Version 1 of each model in the index: its state."""
    rows = client.get_model_repository_index(headers=auth())
    return {row["name"]: row["state"] for row in rows if row["version"] == "1"}


def test_load_serves_on_every_worker_and_unload_removes_it(server: ProcessServer) -> None:
    with _rest(server) as rest:
        index = _index(rest)
        assert index[FAKE_MODEL] == "READY" and index[OTHER] == "UNAVAILABLE"
        assert "efficientnet-lite0" in index  # the shipped manifests are listed too
        assert {row["name"] for row in rest.get_model_repository_index(
            headers=auth(), query_params={}) if row["state"] == "READY"} == {FAKE_MODEL}  # fmt: skip
        assert _infer_status(server, OTHER) == 404
        rest.load_model(OTHER, headers=auth())
        assert rest.is_model_ready(OTHER)
        assert [_infer_status(server, OTHER) for _ in range(12)] == [200] * 12
        assert _index(rest)[OTHER] == "READY"
        rest.load_model(OTHER, headers=auth())  # loaded already: nothing to do, still 200
        rest.unload_model(OTHER, headers=auth())
        assert [_infer_status(server, OTHER) for _ in range(12)] == [404] * 12
        assert _index(rest)[OTHER] == "UNAVAILABLE"
        # The first model never stopped answering.
        assert _infer_status(server, FAKE_MODEL) == 200


def test_the_grpc_twins(server: ProcessServer) -> None:
    with triton_grpc.InferenceServerClient(server.grpc_url) as client:
        index = {m.name: m.state for m in client.get_model_repository_index(headers=auth()).models
                 if m.version == "1"}  # fmt: skip
        assert index[FAKE_MODEL] == "READY"
        client.load_model(OTHER, headers=auth())
        tensor = triton_grpc.InferInput("input", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(marked_tensor(0.6))
        got = client.infer(OTHER, [tensor], headers=auth()).as_numpy("probabilities")
        np.testing.assert_allclose(got, FakeEngine().reference(marked_tensor(0.6)), rtol=1e-6)
        client.unload_model(OTHER, headers=auth())
        with pytest.raises(InferenceServerException) as info:
            client.infer(OTHER, [tensor], headers=auth())
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            client.load_model(OTHER)  # no key
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"


@pytest.mark.parametrize(
    ("name", "status"),
    [("a..b", 400), ("has space", 400), ("no-such-model", 404), ("x.toml", 404)],
)
def test_a_name_must_be_a_manifest_of_the_models_folders(
    server: ProcessServer, name: str, status: int
) -> None:
    with httpx.Client(base_url=server.url, timeout=30, headers=auth()) as http:
        response = http.post(f"/v2/repository/models/{name}/load")
    assert response.status_code == status, response.text
    assert response.json()["error"]


def test_a_path_in_the_name_never_reaches_a_file(server: ProcessServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30, headers=auth()) as http:
        for name in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..%2Fmodels%2Fx"):
            response = http.post(f"/v2/repository/models/{name}/load")
            assert response.status_code in (400, 404) and "error" in response.json()
        index = http.post("/v2/repository/index").json()
    assert all("/" not in row["name"] for row in index)


def test_the_key_and_unsupported_parameters(server: ProcessServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v2/repository/index").status_code == 401
        config = {"parameters": {"config": "{}"}}
        answer = http.post(f"/v2/repository/models/{OTHER}/load", json=config, headers=auth())
        assert answer.status_code == 400 and "not supported" in answer.json()["error"]


def test_off_by_default(models_dir: Path) -> None:
    env = _env(models_dir, ESCORT_WORKERS="1")
    del env["ESCORT_REPOSITORY_API"]
    with (
        ProcessServer("tests.service.fake_server", env) as plain,
        httpx.Client(base_url=plain.url, timeout=30, headers=auth()) as http,
    ):
        for path in ("/v2/repository/index", f"/v2/repository/models/{OTHER}/load"):
            response = http.post(path)
            assert response.status_code == 403
            assert "ESCORT_REPOSITORY_API" in response.json()["error"]


def test_unload_lets_queued_requests_finish(models_dir: Path) -> None:
    # Batches of 2 s: the three requests have that long to all reach the engine, which a busy
    # 2-core host needs (with 1 s the third once arrived after the first batch ended).
    env = _env(models_dir, ESCORT_WORKERS="2", FAKE_DELAY_S="2.0", ESCORT_MAX_BATCH_SIZE="1")
    with ProcessServer("tests.service.fake_server", env) as slow, _rest(slow) as rest:
        rest.load_model(OTHER, headers=auth())
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(_infer_status(slow, OTHER)))
                   for _ in range(3)]  # fmt: skip
        for thread in threads:
            thread.start()
        # All three in the engine: one in its batch (of one, 2 s), two queued behind it.
        wait_metric(slow, "escort_queue_depth", 2, model=OTHER)
        started = time.monotonic()
        rest.unload_model(OTHER, headers=auth())
        waited = time.monotonic() - started
        for thread in threads:
            thread.join(30)
        assert codes == [200, 200, 200]
        assert waited >= 1.6  # the unload waited for the queue: the batches of 2 s behind it
        assert _infer_status(slow, OTHER) == 404


def test_loading_a_model_keeps_the_others_serving(models_dir: Path) -> None:
    env = _env(models_dir, ESCORT_WORKERS="2", FAKE_LOAD_S="1.5")
    with ProcessServer("tests.service.fake_server", env) as loading:
        loader = threading.Thread(target=lambda: _rest(loading).load_model(OTHER, headers=auth()))
        loader.start()
        time.sleep(0.2)
        answered = []
        while loader.is_alive():
            answered.append(_infer_status(loading, FAKE_MODEL))
        loader.join()
        assert len(answered) >= 3 and set(answered) == {200}
        assert _infer_status(loading, OTHER) == 200


def _infer(server: ProcessServer, path: str) -> tuple[int, dict]:
    with httpx.Client(base_url=server.url, timeout=30, headers=auth()) as http:
        response = http.post(path, json=tensor_body(marked_tensor(0.8)))
    return response.status_code, response.json()


def _probabilities(body: dict) -> np.ndarray:
    output = body["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def test_two_versions_answer_side_by_side(server: ProcessServer) -> None:
    want_v1 = FakeEngine().reference(marked_tensor(0.8))
    want_v2 = want_v1[:, ::-1]  # the fake's version 2 answers its classes reversed
    with _rest(server) as rest:
        rest.load_model(f"{FAKE_MODEL}@2", headers=auth())
        try:
            assert rest.get_model_metadata(FAKE_MODEL)["versions"] == ["1", "2"]
            assert rest.is_model_ready(FAKE_MODEL, "1") and rest.is_model_ready(FAKE_MODEL, "2")
            index = {(r["name"], r["version"]): r["state"]
                     for r in rest.get_model_repository_index(headers=auth())}  # fmt: skip
            assert index[(FAKE_MODEL, "1")] == index[(FAKE_MODEL, "2")] == "READY"
            for path, want, version in (
                (f"/v2/models/{FAKE_MODEL}/versions/1/infer", want_v1, "1"),
                (f"/v2/models/{FAKE_MODEL}/versions/2/infer", want_v2, "2"),
                (f"/v2/models/{FAKE_MODEL}/infer", want_v2, "2"),  # the latest
            ):
                code, body = _infer(server, path)
                assert code == 200 and body["model_version"] == version
                np.testing.assert_allclose(_probabilities(body), want, rtol=1e-6)
            assert _infer(server, f"/v2/models/{FAKE_MODEL}/versions/3/infer")[0] == 404
            with triton_grpc.InferenceServerClient(server.grpc_url) as client:
                tensor = triton_grpc.InferInput("input", [1, 3, 32, 32], "FP32")
                tensor.set_data_from_numpy(marked_tensor(0.8))
                for version, want in (("1", want_v1), ("2", want_v2)):
                    result = client.infer(FAKE_MODEL, [tensor], model_version=version,
                                          headers=auth())  # fmt: skip
                    assert result.get_response().model_version == version
                    np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=1e-6)
        finally:
            rest.unload_model(f"{FAKE_MODEL}@2", headers=auth())
        code, body = _infer(server, f"/v2/models/{FAKE_MODEL}/infer")
        assert code == 200 and body["model_version"] == "1"
        assert _infer(server, f"/v2/models/{FAKE_MODEL}/versions/2/infer")[0] == 404
        assert rest.get_model_metadata(FAKE_MODEL)["versions"] == ["1"]
