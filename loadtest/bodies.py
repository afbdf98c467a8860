"""Request bodies of the load test, shared by the Locust users and the wrk driver: v1 multipart
with `image` fields, and KServe V2 binary requests (a BYTES `image` tensor of encoded photos, or
the FP32 `input` tensor of preprocessed ones). Plain stdlib, so tests can import it without Locust.
"""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

from loadtest.images import LoadImage


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
    raw = b"".join(struct.pack("<I", len(image.data)) + image.data for image in images)
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(images)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    if backend:
        header["parameters"] = {"backend": backend}
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + raw, len(head)


def v2_tensor_body(tensors: list[bytes], crop: int, backend: str | None) -> tuple[bytes, int]:
    """A V2 request with preprocessed images as one FP32 `input` tensor [N, 3, crop, crop]."""
    raw = b"".join(tensors)
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": [len(tensors), 3, crop, crop],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    if backend:
        header["parameters"] = {"backend": backend}
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + raw, len(head)
