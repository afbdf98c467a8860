"""KServe V2 request bodies as the tests send them, written out by hand (not by the service's
own codec), so that the tests check the service against the protocol."""

from __future__ import annotations

import json

import numpy as np


def tensor_body(tensor: np.ndarray, **extra) -> dict:
    """A JSON body with one FP32 input named "input"; `extra` adds top-level fields."""
    entry = {"name": "input", "shape": list(tensor.shape), "datatype": "FP32"}
    return {"inputs": [{**entry, "data": tensor.ravel().tolist()}], **extra}


def binary_request(
    header: dict, blobs: list[bytes], header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body (JSON header, then the raw tensors) and its headers;
    `header_length` overrides the declared JSON length (to send a wrong one)."""
    head = json.dumps(header).encode()
    declared = len(head) if header_length is None else header_length
    return head + b"".join(blobs), {
        "Inference-Header-Content-Length": str(declared),
        "Content-Type": "application/octet-stream",
    }


def binary_body(header: dict, blob: bytes, length: int | None = None) -> dict:
    """binary_request as keyword arguments for an HTTP client's post()."""
    content, headers = binary_request(header, [blob], length)
    return {"content": content, "headers": headers}
