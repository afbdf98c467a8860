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
    return _v2_binary_body("image", [len(images)], "BYTES", raw, backend)


def v2_tensor_body(tensors: list[bytes], crop: int, backend: str | None) -> tuple[bytes, int]:
    """A V2 request with preprocessed images as one FP32 `input` tensor [N, 3, crop, crop]."""
    raw = b"".join(tensors)
    return _v2_binary_body("input", [len(tensors), 3, crop, crop], "FP32", raw, backend)


def _v2_binary_body(
    name: str, shape: list[int], datatype: str, raw: bytes, backend: str | None
) -> tuple[bytes, int]:
    """One input in the binary extension, probabilities asked for as binary; returns the body
    and the length of its JSON header."""
    entry = {"name": name, "shape": shape, "datatype": datatype}
    entry["parameters"] = {"binary_data_size": len(raw)}
    header: dict[str, Any] = {
        "inputs": [entry],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    if backend:
        header["parameters"] = {"backend": backend}
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + raw, len(head)
