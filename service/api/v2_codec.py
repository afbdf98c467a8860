"""The KServe V2 inference codec: JSON and the binary tensor data extension, both ways.

A request body is a JSON object, optionally followed by raw tensor bytes; the
`Inference-Header-Content-Length` header says where the JSON ends. An input travels in binary
when its `parameters.binary_data_size` is set, in input order after the JSON. Binary BYTES
elements are each a 4-byte little-endian length and the bytes; in JSON, BYTES elements are
strings, which for images means base64. Responses mirror this: an output is binary when its
request asked with `parameters.binary_data` (or the request with `binary_data_output`).
The JSON document itself is decoded in v2_json. Nothing here knows about HTTP.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.api.v2_json import (
    INT64_MAX,
    INT64_MIN,
    TENSOR_DTYPES,
    V2Output,
    V2Tensor,
    decode_data,
    has_data,
    numbers_from_json,
    parse_json,
)
from service.engine.protocol import ModelDescription
from service.errors import BadInputError, BadTensorError, SchemaError

IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
OUTPUT = "probabilities"


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # top-k strings instead of probabilities when > 0


@dataclass
class InferRequest:
    id: str | None
    backend: str | None
    timeout_s: float | None
    outputs: list[RequestedOutput]
    images: list[bytes] | None = None
    tensor: np.ndarray | None = field(default=None, repr=False)


def request_parameter(
    params: dict[str, Any] | None, key: str, kind: type | tuple[type, ...], where: str
):
    if not params or key not in params:
        return None
    value = params[key]
    # bool is an int subclass in Python; keep the two apart.
    if isinstance(value, bool) and kind is int:
        raise SchemaError(f"{where} parameter {key!r} must be an integer, not a boolean")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SchemaError(f"{where} parameter {key!r} must be {names}, got {value!r:.80}")
    # The spec's int64_param; JSON itself has no bound (a timeout of 10**400 overflowed).
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise SchemaError(f"{where} parameter {key!r} must be a 64-bit integer")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes | memoryview]:
    """The JSON document and the binary data after it (Inference-Header-Content-Length)."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise BadInputError(
            f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
        ) from None
    if not 0 < length <= len(body):
        raise BadInputError(
            f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes"
        )
    # A view: slicing bytes would copy the tensor data (600 KB an image) once more.
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _element_count(tensor: V2Tensor) -> int:
    if any(dim < 0 for dim in tensor.shape):
        raise BadTensorError(f"input {tensor.name!r} has a negative dimension {tensor.shape}")
    return math.prod(tensor.shape)


def decode_bytes_elements(raw: bytes, expected: int, name: str) -> list[bytes]:
    """Split the binary form of a BYTES tensor: 4-byte little-endian length, then the bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadTensorError(f"binary BYTES data of {name!r} ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadTensorError(
                f"binary BYTES element {len(items)} of {name!r} claims {length} bytes but "
                f"only {len(raw) - offset} remain"
            )
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != expected:
        raise BadTensorError(f"{name!r} has shape for {expected} elements but carries {len(items)}")
    return items


def encode_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _images_from_json(tensor: V2Tensor, expected: int) -> list[bytes]:
    data = decode_data(tensor)
    # Shape [N] or [N, 1]: a flat list of strings, or a list of one-string lists.
    items: list[Any] = []
    for item in data if isinstance(data, list) else [data]:
        items.extend(item if isinstance(item, list) else [item])
    if len(items) != expected:
        raise BadTensorError(
            f"input {tensor.name!r} has shape {tensor.shape} but carries {len(items)} elements"
        )
    images = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise BadTensorError(f"BYTES element {index} of {tensor.name!r} must be a string")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadTensorError(
                f"BYTES element {index} of {tensor.name!r} is not base64; in JSON send images "
                "base64-encoded, or raw with the binary tensor extension"
            ) from None
    return images


def parse_image_input(tensor: V2Tensor, raw: bytes | None) -> list[bytes]:
    """The encoded images of the `image` input, from raw BYTES or from JSON base64."""
    if tensor.datatype != "BYTES":
        raise BadTensorError(f"input {IMAGE_INPUT!r} must be BYTES, got {tensor.datatype!r}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise BadTensorError(f"input {IMAGE_INPUT!r} must have shape [N] (or [N, 1]), got {shape}")
    expected = _element_count(tensor)
    if raw is not None:
        return decode_bytes_elements(raw, expected, IMAGE_INPUT)
    return _images_from_json(tensor, expected)


def parse_tensor_input(
    tensor: V2Tensor, raw: bytes | None, chw: tuple[int, int, int]
) -> np.ndarray:
    """The `input` tensor [N, *chw], from raw little-endian bytes or from JSON numbers."""
    dtype = TENSOR_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise BadTensorError(
            f"input {TENSOR_INPUT!r} must be FP32 or FP16, got {tensor.datatype!r}"
        )
    shape = tensor.shape
    if len(shape) != 4 or tuple(shape[1:]) != chw:
        raise BadTensorError(
            f"input {TENSOR_INPUT!r} must have shape [N, {chw[0]}, {chw[1]}, {chw[2]}], got {shape}"
        )
    count = _element_count(tensor)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise BadTensorError(
                f"binary data of {TENSOR_INPUT!r} is {len(raw)} bytes; shape {shape} of "
                f"{tensor.datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        array = numbers_from_json(tensor, count)
    if not np.isfinite(array).all():
        raise BadTensorError(f"input {TENSOR_INPUT!r} contains NaN or infinity")
    return array.reshape(shape)


def requested_outputs(
    outputs: list[V2Output] | None, binary_default: bool
) -> list[RequestedOutput]:
    if not outputs:
        return [RequestedOutput(OUTPUT, binary_default)]
    seen: set[str] = set()
    result = []
    for output in outputs:
        if output.name != OUTPUT:
            raise BadInputError(f"unknown output {output.name!r}; the model has {OUTPUT!r}")
        if output.name in seen:
            raise BadInputError(f"output {output.name!r} is requested twice")
        seen.add(output.name)
        where = f"output {output.name!r}"
        binary = request_parameter(output.parameters, "binary_data", bool, where)
        k = request_parameter(output.parameters, "classification", int, where) or 0
        if k < 0:
            raise SchemaError(f"{where} parameter 'classification' must be >= 0, got {k}")
        result.append(RequestedOutput(output.name, binary_default if binary is None else binary, k))
    return result


def parse_infer_request(
    header: bytes,
    binary: bytes | memoryview,
    chw: tuple[int, int, int],
    max_rows: int | None = None,
) -> InferRequest:
    """Decode a V2 infer request (its JSON `header` and the `binary` data after it, from
    split_body) for a model whose tensor input is [N, *chw]; more than `max_rows` rows
    (images) are refused before their data is decoded."""
    request = parse_json(header)
    params = request.parameters
    backend = request_parameter(params, "backend", str, "request")
    timeout_us = request_parameter(params, "timeout", int, "request")
    if timeout_us is not None and timeout_us < 0:
        raise SchemaError(f"request parameter 'timeout' (microseconds) must be >= 0: {timeout_us}")
    binary_output = bool(request_parameter(params, "binary_data_output", bool, "request"))

    names = [tensor.name for tensor in request.inputs]
    for name in names:
        if name not in (IMAGE_INPUT, TENSOR_INPUT):
            raise BadTensorError(
                f"unknown input {name!r}; send {IMAGE_INPUT!r} (BYTES images) or "
                f"{TENSOR_INPUT!r} (FP32/FP16 tensor)"
            )
    if len(names) != 1:
        raise BadTensorError(
            f"send exactly one input, {IMAGE_INPUT!r} or {TENSOR_INPUT!r}; got {names}"
        )

    shape = request.inputs[0].shape
    if max_rows is not None and shape and shape[0] > max_rows:
        raise BadTensorError(
            f"the request carries {shape[0]} images; at most {max_rows} per request "
            "(ESCORT_MAX_IMAGES_PER_REQUEST); split it"
        )

    offset = 0
    raws: list[bytes | None] = []
    for tensor in request.inputs:
        size = request_parameter(
            tensor.parameters, "binary_data_size", int, f"input {tensor.name!r}"
        )
        if size is None:
            if not has_data(tensor):
                raise BadTensorError(
                    f"input {tensor.name!r} has neither `data` nor a binary_data_size parameter"
                )
            raws.append(None)
            continue
        if has_data(tensor):
            raise BadTensorError(f"input {tensor.name!r} has both `data` and binary data")
        if size < 0 or offset + size > len(binary):
            raise BadTensorError(
                f"input {tensor.name!r} declares binary_data_size {size} but only "
                f"{len(binary) - offset} binary bytes follow the JSON"
            )
        raws.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise BadTensorError(
            f"{len(binary) - offset} bytes after the JSON header belong to no input; check "
            "Inference-Header-Content-Length and binary_data_size"
        )

    result = InferRequest(
        id=request.id,
        backend=backend,
        timeout_s=(timeout_us / 1e6) if timeout_us else None,
        outputs=requested_outputs(request.outputs, binary_output),
    )
    set_input(result, request.inputs[0], raws[0], chw)
    return result


def set_input(
    request: InferRequest, tensor: V2Tensor, raw: bytes | None, chw: tuple[int, int, int]
) -> None:
    """The request's one input, parsed into `images` or `tensor` (REST and gRPC alike)."""
    if tensor.name == IMAGE_INPUT:
        request.images = parse_image_input(tensor, raw)
    else:
        request.tensor = parse_tensor_input(tensor, raw, chw)


def classification_strings(
    probabilities: np.ndarray, k: int, labels: tuple[str, ...]
) -> list[list[bytes]]:
    """The classification extension's "score:index:label" strings, best first, per row."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = []
    for row, indices in zip(probabilities, order, strict=True):
        entries = []
        for index in indices:
            label = labels[index] if index < len(labels) else ""
            text = f"{float(row[index]):f}:{int(index)}"
            entries.append((f"{text}:{label}" if label else text).encode())
        rows.append(entries)
    return rows


@dataclass
class EncodedOutput:
    """One output of an answer in both forms: the raw bytes and the JSON values."""

    name: str
    datatype: str
    shape: list[int]
    blob: bytes
    binary: bool
    json_data: list[Any] = field(repr=False)


def encode_outputs(
    request: InferRequest, probabilities: np.ndarray, labels: tuple[str, ...]
) -> list[EncodedOutput]:
    """Each requested output: probabilities (FP32) or classification strings (BYTES)."""
    encoded = []
    batch = int(probabilities.shape[0])
    for wanted in request.outputs:
        if wanted.classification > 0:
            rows = classification_strings(probabilities, wanted.classification, labels)
            flat = [item for row in rows for item in row]
            shape = [batch, len(rows[0]) if rows else 0]
            encoded.append(EncodedOutput(wanted.name, "BYTES", shape, encode_bytes_elements(flat),
                                         wanted.binary, [item.decode() for item in flat]))  # fmt: skip
        else:
            values = np.ascontiguousarray(probabilities, dtype="<f4")
            encoded.append(EncodedOutput(wanted.name, "FP32", list(values.shape), values.tobytes(),
                                         wanted.binary, values.ravel().tolist() if not wanted.binary else []))  # fmt: skip
    return encoded


def encode_infer_response(
    model: ModelDescription, request: InferRequest, probabilities: np.ndarray, backend: str
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in encode_outputs(request, probabilities, model.labels):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": output.shape}  # fmt: skip
        if output.binary:
            entry["parameters"] = {"binary_data_size": len(output.blob)}
            blobs.append(output.blob)
        else:
            entry["data"] = output.json_data
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model.model_name, "model_version": model.version}
    if request.id is not None:
        document["id"] = request.id
    document["parameters"] = {"backend": backend}
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
