"""The hostile and malformed requests of test_errors.py: (id, method, path, request kwargs or
a callable of the photos, expected status, words the error must contain)."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image

from tests.service.fakes import FAKE_MODEL, encode_image, marked_tensor
from tests.service.test_preprocess import png_with_size
from tests.v2_bodies import binary_tensor_request, bytes_input, request, tensor_body

V1 = f"/v1/models/{FAKE_MODEL}/classify"
V2 = f"/v2/models/{FAKE_MODEL}/infer"
LIMIT_BYTES = 2_000_000


def binary_body(header: dict, blob: bytes, length: int | None = None) -> dict:
    """A binary-extension body written by hand, for the malformed ones no client would encode
    (sizes that disagree, a wrong header length); `length` overrides the declared one."""
    head = json.dumps(header).encode()
    declared = len(head) if length is None else length
    return {
        "content": head + blob,
        "headers": {
            "Inference-Header-Content-Length": str(declared),
            "Content-Type": "application/octet-stream",
        },
    }


def as_kwargs(body_and_headers: tuple[bytes, dict[str, str]]) -> dict:
    """A tritonclient-encoded body as keyword arguments for an HTTP client's post()."""
    content, headers = body_and_headers
    return {"content": content, "headers": headers}


def binary_input(name: str, datatype: str, shape: list[int], size: int) -> dict:
    return {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": size},
            }
        ]
    }


def _cat(photos) -> bytes:
    return photos["cat.jpg"]


ONE = marked_tensor(0.5)
NAN = ONE.copy()
NAN[0, 1, 2, 3] = np.nan
BIG_JPEG = encode_image(Image.new("RGB", (1200, 1000), (1, 2, 3)), "JPEG")


def multipart_text_field() -> dict:
    return {"files": {"image": (None, "not a file")}}


def chunked(size: int) -> Iterator[bytes]:
    for _ in range(size // 65536 + 1):
        yield b"\x00" * 65536


# (id, method, path, request kwargs or a callable of photos, status, words in the error)
CASES = [
    (
        "v1-empty-image",
        "POST",
        V1,
        {"content": b"", "headers": {"Content-Type": "image/jpeg"}},
        400,
        "empty",
    ),
    (
        "v1-truncated-jpeg",
        "POST",
        V1,
        lambda p: {"files": {"image": ("c.jpg", _cat(p)[:5000])}},
        400,
        "truncated",
    ),
    (
        "v1-corrupt-bytes",
        "POST",
        V1,
        {"files": {"image": ("x.jpg", bytes(range(256)) * 40)}},
        400,
        "not a readable image",
    ),
    (
        "v1-text-as-image",
        "POST",
        V1,
        {"files": {"image": ("x.jpg", b"just some text")}},
        400,
        "not a readable image",
    ),
    (
        "v1-bomb-header",
        "POST",
        V1,
        {"files": {"image": ("b.png", png_with_size(40000, 40000))}},
        400,
        "ESCORT_MAX_IMAGE_PIXELS",
    ),
    (
        "v1-huge-image",
        "POST",
        V1,
        {"files": {"image": ("h.jpg", BIG_JPEG)}},
        400,
        "above the limit",
    ),
    (
        "v1-text-plain",
        "POST",
        V1,
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "Content-Type",
    ),
    ("v1-json-body", "POST", V1, {"json": {"image": "x"}}, 415, "multipart"),
    ("v1-no-content-type", "POST", V1, {"content": b"abc"}, 415, "Content-Type"),
    (
        "v1-wrong-field",
        "POST",
        V1,
        lambda p: {"files": {"file": ("c.jpg", _cat(p))}},
        400,
        "no 'image' field",
    ),
    ("v1-text-field", "POST", V1, multipart_text_field(), 400, "not a file"),
    (
        "v1-no-boundary",
        "POST",
        V1,
        {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        "boundary",
    ),
    (
        "v1-top-k-zero",
        "POST",
        V1 + "?top_k=0",
        lambda p: {"files": {"image": ("c.jpg", _cat(p))}},
        422,
        "top_k",
    ),
    (
        "v1-top-k-text",
        "POST",
        V1 + "?top_k=many",
        lambda p: {"files": {"image": ("c.jpg", _cat(p))}},
        422,
        "top_k",
    ),
    (
        "v1-unknown-backend",
        "POST",
        V1 + "?backend=turbo",
        lambda p: {"files": {"image": ("c.jpg", _cat(p))}},
        400,
        "sparse, dense",
    ),
    (
        "v1-unknown-model",
        "POST",
        "/v1/models/nope/classify",
        lambda p: {"files": {"image": ("c.jpg", _cat(p))}},
        404,
        "fake-net",
    ),
    (
        "v1-too-many-images",
        "POST",
        V1,
        lambda p: {"files": [("image", ("c.jpg", _cat(p)))] * 9},
        400,
        "files",
    ),
    (
        "v2-bad-json",
        "POST",
        V2,
        {"content": b'{"inputs": [', "headers": {"Content-Type": "application/json"}},
        400,
        "not valid JSON",
    ),
    ("v2-json-array", "POST", V2, {"json": [1, 2, 3]}, 422, "JSON object"),
    ("v2-missing-inputs", "POST", V2, {"json": {"outputs": []}}, 422, "inputs"),
    ("v2-empty-inputs", "POST", V2, {"json": {"inputs": []}}, 422, "inputs"),
    ("v2-id-not-string", "POST", V2, {"json": {**tensor_body(ONE), "id": 7}}, 422, "id"),
    (
        "v2-wrong-shape",
        "POST",
        V2,
        {"json": tensor_body(np.zeros((1, 3, 8, 8), np.float32))},
        400,
        "[N, 3, 32, 32]",
    ),
    (
        "v2-negative-dim",
        "POST",
        V2,
        {
            "json": {
                "inputs": [
                    {"name": "input", "shape": [-1, 3, 32, 32], "datatype": "FP32", "data": [0]}
                ]
            }
        },
        400,
        "negative dimension",
    ),
    (
        "v2-wrong-dtype",
        "POST",
        V2,
        {
            "json": {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "INT32",
                        "data": [0] * 3072,
                    }
                ]
            }
        },
        400,
        "FP32 or FP16",
    ),
    (
        "v2-count-mismatch",
        "POST",
        V2,
        {
            "json": {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "FP32",
                        "data": [0.0] * 100,
                    }
                ]
            }
        },
        400,
        "carries 100",
    ),
    (
        "v2-strings-as-numbers",
        "POST",
        V2,
        {
            "json": {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "FP32",
                        "data": ["a"] * 3072,
                    }
                ]
            }
        },
        400,
        "numbers",
    ),
    (
        "v2-nan-json",
        "POST",
        V2,
        {
            "content": b'{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32","data":[NaN]}]}'
        },
        400,
        "not valid JSON",
    ),
    (
        "v2-nan-binary",
        "POST",
        V2,
        as_kwargs(binary_tensor_request(NAN)),
        400,
        "NaN",
    ),
    (
        "v2-binary-size-too-big",
        "POST",
        V2,
        binary_body(binary_input("input", "FP32", [1, 3, 32, 32], ONE.nbytes + 4), ONE.tobytes()),
        400,
        "binary_data_size",
    ),
    (
        "v2-binary-wrong-size",
        "POST",
        V2,
        binary_body(binary_input("input", "FP32", [1, 3, 32, 32], 100), ONE.tobytes()[:100]),
        400,
        "needs 12288",
    ),
    (
        "v2-trailing-bytes",
        "POST",
        V2,
        binary_body(
            binary_input("input", "FP32", [1, 3, 32, 32], ONE.nbytes), ONE.tobytes() + b"junk"
        ),
        400,
        "belong to no input",
    ),
    (
        "v2-header-length-too-big",
        "POST",
        V2,
        binary_body(
            binary_input("input", "FP32", [1, 3, 32, 32], ONE.nbytes), ONE.tobytes(), length=10**7
        ),
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "v2-header-length-text",
        "POST",
        V2,
        binary_body(
            binary_input("input", "FP32", [1, 3, 32, 32], ONE.nbytes), ONE.tobytes(), length=None
        )
        | {"headers": {"Inference-Header-Content-Length": "ten"}},
        400,
        "integer",
    ),
    (
        "v2-bytes-not-base64",
        "POST",
        V2,
        {
            "json": {
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["***"]}]
            }
        },
        400,
        "base64",
    ),
    (
        "v2-bytes-truncated-prefix",
        "POST",
        V2,
        binary_body(binary_input("image", "BYTES", [1], 6), struct.pack("<I", 900) + b"ab"),
        400,
        "claims 900 bytes",
    ),
    (
        "v2-bytes-count-mismatch",
        "POST",
        V2,
        lambda p: binary_body(
            binary_input("image", "BYTES", [2], len(_cat(p)) + 4),
            struct.pack("<I", len(_cat(p))) + _cat(p),
        ),
        400,
        "carries 1",
    ),
    (
        "v2-bytes-corrupt-image",
        "POST",
        V2,
        as_kwargs(request([bytes_input([b"\xff\xd8\xff\x00"])])),
        400,
        "not a readable image",
    ),
    (
        "v2-image-wrong-dtype",
        "POST",
        V2,
        {"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}},
        400,
        "BYTES",
    ),
    (
        "v2-unknown-input",
        "POST",
        V2,
        {"json": {"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}]}},
        400,
        "unknown input",
    ),
    (
        "v2-two-inputs",
        "POST",
        V2,
        {"json": {"inputs": tensor_body(ONE)["inputs"] * 2}},
        400,
        "exactly one input",
    ),
    (
        "v2-unknown-output",
        "POST",
        V2,
        {"json": tensor_body(ONE, output="logits")},
        400,
        "unknown output",
    ),
    (
        "v2-bad-classification",
        "POST",
        V2,
        {
            "json": {
                **tensor_body(ONE),
                "outputs": [{"name": "probabilities", "parameters": {"classification": "three"}}],
            }
        },
        422,
        "classification",
    ),
    (
        "v2-unknown-backend",
        "POST",
        V2,
        {"json": tensor_body(ONE, parameters={"backend": "turbo"})},
        400,
        "sparse, dense",
    ),
    (
        "v2-timeout-not-int",
        "POST",
        V2,
        {"json": tensor_body(ONE, timeout="soon")},
        422,
        "timeout",
    ),
    (
        "v2-unknown-model",
        "POST",
        "/v2/models/nope/infer",
        {"json": tensor_body(ONE)},
        404,
        "fake-net",
    ),
    (
        "v2-text-plain",
        "POST",
        V2,
        {"content": b"{}", "headers": {"Content-Type": "text/plain"}},
        415,
        "Content-Type",
    ),
    (
        "v2-brotli",
        "POST",
        V2,
        {"content": b"xx", "headers": {"Content-Encoding": "br"}},
        415,
        "Content-Encoding",
    ),
    (
        "v2-bad-gzip",
        "POST",
        V2,
        {"content": b"not gzip", "headers": {"Content-Encoding": "gzip"}},
        400,
        "gzip",
    ),
    (
        "v2-gzip-bomb",
        "POST",
        V2,
        {
            "content": gzip.compress(b" " * (LIMIT_BYTES * 3)),
            "headers": {"Content-Encoding": "gzip"},
        },
        413,
        "ESCORT_MAX_REQUEST_BYTES",
    ),
    (
        "oversized-content-length",
        "POST",
        V2,
        {"content": b"\x00" * (LIMIT_BYTES + 1)},
        413,
        "ESCORT_MAX_REQUEST_BYTES",
    ),
    (
        "oversized-chunked",
        "POST",
        V1,
        {"content": chunked(LIMIT_BYTES * 2), "headers": {"Content-Type": "image/png"}},
        413,
        "ESCORT_MAX_REQUEST_BYTES",
    ),
    ("unknown-route", "GET", "/v3/whatever", {}, 404, "no such endpoint"),
    ("wrong-method", "GET", V2, {}, 405, "method not allowed"),
    (
        "version-2",
        "POST",
        f"/v2/models/{FAKE_MODEL}/versions/2/infer",
        {"json": tensor_body(ONE)},
        404,
        "version",
    ),
]
