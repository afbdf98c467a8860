"""Request bodies of the load test, shared by the Locust users and the wrk driver: v1 multipart
with `image` fields, and KServe V2 binary requests (a BYTES `image` tensor of encoded photos, or
the FP32 `input` tensor of preprocessed ones).

V2 bodies come from tritonclient's own encoder (`InferenceServerClient.generate_request_body`),
so the load test sends what a real KServe client sends. A GPU host may lack tritonclient (its
wheels are carried by hand); there the small built-in encoder below takes over, after one log
line. The two give the same bytes (tests/ops/test_loadtest_bodies.py checks it). No Locust here,
so tests can import this module.
"""

from __future__ import annotations

import json
import struct
import sys
import uuid
from typing import Any

import numpy as np

from loadtest.images import LoadImage

try:
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
except ImportError:  # tritonclient absent, or one of its dependencies (geventhttpclient, ...)
    ENCODER = "built-in"
    print(
        "loadtest: tritonclient is missing; V2 bodies come from the built-in encoder",
        file=sys.stderr,
        flush=True,
    )
else:
    ENCODER = "tritonclient"

OUTPUT = "probabilities"


def multipart_body(images: list[LoadImage]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for image in images:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{image.name}"\r\nContent-Type: {image.content_type}\r\n\r\n'
        )
        parts.append(head.encode() + image.data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def v2_binary_body(images: list[LoadImage], backend: str | None) -> tuple[bytes, int]:
    """A V2 request with the images as one BYTES tensor in the binary extension; returns the
    body and the length of its JSON header."""
    items = [image.data for image in images]
    if ENCODER == "tritonclient":
        return _triton_body("image", "BYTES", np.array(items, dtype=np.object_), backend)
    raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
    return builtin_body("image", [len(items)], "BYTES", raw, backend)


def v2_tensor_body(tensors: list[bytes], crop: int, backend: str | None) -> tuple[bytes, int]:
    """A V2 request with preprocessed images as one FP32 `input` tensor [N, 3, crop, crop]."""
    shape = [len(tensors), 3, crop, crop]
    raw = b"".join(tensors)
    if ENCODER == "tritonclient":
        array = np.frombuffer(raw, dtype="<f4").reshape(shape)
        return _triton_body("input", "FP32", array, backend)
    return builtin_body("input", shape, "FP32", raw, backend)


def _triton_body(
    name: str, datatype: str, array: np.ndarray, backend: str | None
) -> tuple[bytes, int]:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    body, length = InferenceServerClient.generate_request_body(
        [tensor],
        outputs=[InferRequestedOutput(OUTPUT, binary_data=True)],
        parameters={"backend": backend} if backend else None,
    )
    return body, int(length)


def builtin_body(
    name: str, shape: list[int], datatype: str, raw: bytes, backend: str | None
) -> tuple[bytes, int]:
    """The fallback: one input in the binary extension, probabilities asked for as binary,
    laid out key for key as tritonclient lays it out; returns the body and its header length."""
    entry = {"name": name, "shape": shape, "datatype": datatype}
    entry["parameters"] = {"binary_data_size": len(raw)}
    header: dict[str, Any] = {
        "inputs": [entry],
        "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
    }
    if backend:
        header["parameters"] = {"backend": backend}
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + raw, len(head)
