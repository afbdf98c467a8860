"""KServe V2 request bodies as the tests send them, encoded by tritonclient (an independent
client, not the service's own codec), so that the tests check the service against what real
clients send. Deliberately malformed bodies are written out by hand where they are used
(tests/api/hostile_cases.py), since no client would encode them."""

from __future__ import annotations

import json

import numpy as np
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

OUTPUT = "probabilities"


def infer_input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> InferInput:
    """One input tensor; BYTES takes an object array of bytes."""
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def bytes_input(items: list[bytes], name: str = "image") -> InferInput:
    """Encoded images as a BYTES tensor in the binary extension."""
    return infer_input(name, np.array(items, dtype=np.object_), "BYTES")


def request(
    inputs: list[InferInput],
    binary_output: bool = True,
    output: str | None = OUTPUT,
    **options,
) -> tuple[bytes, dict[str, str]]:
    """A body and its HTTP headers: binary extension when an input is binary (with
    Inference-Header-Content-Length), plain JSON otherwise. `output` None names no output, and
    tritonclient then asks for every output in binary (`binary_data_output`). `options` are
    those of generate_request_body (parameters, request_id, timeout)."""
    outputs = [InferRequestedOutput(output, binary_data=binary_output)] if output else None
    body, length = InferenceServerClient.generate_request_body(inputs, outputs=outputs, **options)
    if length is None:
        return body, {"Content-Type": "application/json"}
    return body, {
        "Inference-Header-Content-Length": str(length),
        "Content-Type": "application/octet-stream",
    }


def tensor_body(tensor: np.ndarray, **options) -> dict:
    """A JSON body (for `json=`) with one FP32 input named "input" and the output asked for as
    JSON; `options` go to request() (output, parameters, request_id, timeout)."""
    tensor = np.ascontiguousarray(tensor, dtype=np.float32)
    body, _ = request([infer_input("input", tensor, "FP32", binary=False)], False, **options)
    return json.loads(body)


def binary_tensor_request(
    tensor: np.ndarray, datatype: str = "FP32", **options
) -> tuple[bytes, dict[str, str]]:
    """The tensor as a binary `input` (FP32 or FP16); `options` go to request()."""
    return request([infer_input("input", tensor, datatype)], **options)
