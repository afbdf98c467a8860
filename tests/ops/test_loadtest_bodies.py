"""The load test's V2 bodies: built by tritonclient, accepted by the real server (the process
layout with the fake engine), and the built-in fallback for hosts without tritonclient gives the
same bytes and is announced with one log line."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest import bodies
from loadtest.images import make_variants
from tests.ops.conftest import ROOT, run_loadtest
from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
from tests.service.servers import ProcessServer

V2 = f"/v2/models/{FAKE_MODEL}/infer"
FALLBACK_LINE = "loadtest: tritonclient is missing; V2 bodies come from the built-in encoder"


@pytest.fixture(scope="module")
def server():
    env = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_BACKENDS": "sparse,dense", "ESCORT_WORKERS": "2"}
    with ProcessServer("tests.service.fake_server", env) as running:
        yield running


def _probabilities(response) -> np.ndarray:
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    (output,) = header["outputs"]
    return np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])


def _post(server: ProcessServer, body: bytes, length: int):
    headers = {"Inference-Header-Content-Length": str(length),
               "Content-Type": "application/octet-stream"}  # fmt: skip
    with server.client() as http:
        return http.post(V2, content=body, headers=headers)


def test_tritonclient_builds_the_bodies() -> None:
    assert bodies.ENCODER == "tritonclient"  # a dev install has it; the fallback is tested below
    images = make_variants("", (64,))[:2]
    body, length = bodies.v2_binary_body(images, "dense")
    header = json.loads(body[:length])
    assert header["inputs"][0]["shape"] == [2] and header["parameters"] == {"backend": "dense"}
    raw = b"".join(struct.pack("<I", len(i.data)) + i.data for i in images)
    assert body[length:] == raw  # tritonclient's BYTES serialization: length-prefixed items
    # The fallback lays the body out byte for byte as tritonclient does.
    assert (body, length) == bodies.builtin_body("image", [2], "BYTES", raw, "dense")
    rows = [marked_tensor(0.25)[0].tobytes(), marked_tensor(0.75)[0].tobytes()]
    built = bodies.v2_tensor_body(rows, 32, None)
    assert built == bodies.builtin_body("input", [2, 3, 32, 32], "FP32", b"".join(rows), None)


def test_the_real_server_accepts_them(server: ProcessServer) -> None:
    tensor = np.concatenate([marked_tensor(0.2), marked_tensor(0.9)])
    rows = [row.tobytes() for row in tensor]
    for body, length in (
        bodies.v2_tensor_body(rows, 32, "sparse"),
        bodies.builtin_body("input", [2, 3, 32, 32], "FP32", b"".join(rows), "sparse"),
    ):
        response = _post(server, body, length)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(_probabilities(response), FakeEngine().reference(tensor),
                                   rtol=1e-6)  # fmt: skip
    images = make_variants("", (160, 64))
    response = _post(server, *bodies.v2_binary_body(images[:3], "dense"))
    assert response.status_code == 200, response.text
    assert _probabilities(response).shape == (3, 10)


def test_fallback_without_tritonclient(server: ProcessServer) -> None:
    """A host without tritonclient (None in sys.modules makes its import fail): one log line,
    and the built-in bodies still get correct answers from the server."""
    script = (
        "import sys, json\n"
        "sys.modules['tritonclient'] = sys.modules['tritonclient.http'] = None\n"
        "from loadtest import bodies\n"
        "from loadtest.images import make_variants\n"
        "body, length = bodies.v2_binary_body(make_variants('', (64,))[:2], 'sparse')\n"
        "sys.stdout.buffer.write(json.dumps([bodies.ENCODER, length]).encode() + b'\\n' + body)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode().splitlines() == [FALLBACK_LINE]
    first, body = result.stdout.split(b"\n", 1)
    encoder, length = json.loads(first)
    assert encoder == "built-in"
    assert (body, length) == bodies.v2_binary_body(make_variants("", (64,))[:2], "sparse")
    response = _post(server, body, length)
    assert response.status_code == 200 and _probabilities(response).shape == (2, 10)


@pytest.mark.parametrize("v2_input", ["image", "tensor"])
def test_load_test_against_the_real_server(server: ProcessServer, tmp_path: Path,
                                           v2_input: str) -> None:  # fmt: skip
    """Every V2 request of a short run, built by tritonclient, is answered correctly."""
    env = {"LOADTEST_URL": server.url, "LOADTEST_DURATION_S": "3", "LOADTEST_USERS": "2",
           "LOADTEST_PROTOCOLS": "v2", "LOADTEST_V2_INPUT": v2_input, "LOADTEST_SETTLE_S": "0.5",
           "LOADTEST_IMAGE_SIDES": "320,64", "LOADTEST_OUT": str(tmp_path)}  # fmt: skip
    result = run_loadtest(env)
    assert result.returncode == 0, result.stderr
    assert "tritonclient is missing" not in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    (step,) = report["steps"]
    assert step["ok"] > 5 and step["errors"] == {}, step
    assert report["server"]["device"] == "cpu"
