"""The JSON half of the KServe V2 codec: the request document, decoded by msgspec strictly as
the V2 spec types it (no boolean or float where an integer belongs, int64 bounds, no NaN
literals, UTF-8 only, nesting bounded), with each input's `data` kept as its JSON text. A
tensor's numbers go from that text straight into numpy: never a Python float each (32 bytes a
number, 8 to 11 times a body of short numbers), and numpy parses text without the GIL, so a
thread decoding tens of megabytes leaves the event loop free.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
import numpy as np

from service.errors import BadInputError, BadTensorError, SchemaError

TENSOR_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


class V2Tensor(msgspec.Struct, kw_only=True):
    """One input tensor's description (its values in `data`, or as raw bytes beside it).
    Unknown fields are ignored, as the spec lets extensions add them."""

    name: str
    shape: list[Int64]
    datatype: str
    parameters: dict[str, Any] | None = None
    # The JSON text of `data`, checked as JSON but not decoded; empty when absent.
    data: msgspec.Raw = msgspec.Raw()


class V2Output(msgspec.Struct, kw_only=True):
    """One requested output."""

    name: str
    parameters: dict[str, Any] | None = None


class V2Request(msgspec.Struct, kw_only=True):
    """An infer request's JSON document."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: Annotated[list[V2Tensor], msgspec.Meta(min_length=1)]
    outputs: list[V2Output] | None = None


_DECODER = msgspec.json.Decoder(V2Request)


def parse_json(header: bytes) -> V2Request:
    try:
        return _DECODER.decode(header)
    except msgspec.ValidationError as exc:
        raise SchemaError(
            f"invalid inference request: {exc}; the body is a JSON object with an `inputs` list"
        ) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BadInputError(
            f"request body is not valid JSON (UTF-8, RFC 8259): {reason}; binary tensors need "
            "the Inference-Header-Content-Length header"
        ) from None


def has_data(tensor: V2Tensor) -> bool:
    raw = tensor.data
    return len(raw) > 0 and not (len(raw) == 4 and bytes(raw) == b"null")


def decode_data(tensor: V2Tensor) -> Any:
    """`data` as Python values (for BYTES: strings; its text is checked as UTF-8 only here)."""
    try:
        return msgspec.json.decode(tensor.data)
    except (msgspec.DecodeError, RecursionError):
        raise BadTensorError(f"data of {tensor.name!r} is not valid JSON (UTF-8)") from None


# What a list of JSON numbers is made of once its brackets are blanked out.
_NUMBER_TEXT = b"0123456789+-.eE, \t\r\n"
_BLANK_BRACKETS = bytes.maketrans(b"[]", b"  ")
_EMPTY_LIST = re.compile(rb"\[\s*\]")
_DIGIT = re.compile(rb"[0-9]")
_TEXT_CHUNK = 4 << 20  # bytes of JSON text turned into numbers at a time


def numbers_from_json(tensor: V2Tensor, count: int) -> np.ndarray:
    """The numbers of a (nested) JSON list, from its text straight into numpy, a chunk at a
    time (so the text is never copied whole). The decoder has checked that the text is JSON,
    so once the brackets are blanked, only number characters left means numbers between
    commas; strings, booleans, null and objects (which numpy would read as numbers, or skip)
    are refused. Nesting is not checked against the shape, only the count of values: in
    row-major order a flat and a nested list carry the same values."""
    raw = memoryview(tensor.data)
    not_numbers = BadTensorError(
        f"data of {tensor.name!r} must be a (nested) list of numbers, as {tensor.datatype} "
        "says: no strings, booleans, null or NaN"
    )
    if raw[:1] != b"[":
        raise not_numbers
    # An empty list blanks to nothing between two commas, which numpy would read as -1.
    if _EMPTY_LIST.search(raw):
        raise BadTensorError(f"data of {tensor.name!r} holds an empty list")
    # Never more room than the text can fill (a number and its comma take 2 bytes at least),
    # whatever count a hostile shape claims; too few values are then counted and refused.
    out = np.empty(min(count, len(raw) // 2 + 1), dtype=np.float32)
    filled, carry = 0, b""
    for start in range(0, len(raw), _TEXT_CHUNK):
        text = carry + bytes(raw[start : start + _TEXT_CHUNK]).translate(_BLANK_BRACKETS)
        if text.translate(None, _NUMBER_TEXT):
            raise not_numbers
        # Whole numbers only: up to the last comma, the rest goes with the next chunk.
        cut = len(text) if start + _TEXT_CHUNK >= len(raw) else text.rfind(b",")
        text, carry = text[: max(cut, 0)], text[cut + 1 :] if cut >= 0 else text
        found = text.count(b",") + 1 if _DIGIT.search(text) else 0
        if filled + found > count:
            raise BadTensorError(
                f"input {tensor.name!r} has shape {tensor.shape} ({count} values) but carries "
                f"more than {count}"
            )
        if found:  # numpy parses text without holding the GIL
            values = np.fromstring(text, dtype=np.float32, sep=",")
            if values.size != found:
                raise not_numbers
            out[filled : filled + found] = values
            filled += found
    if filled != count:
        raise BadTensorError(
            f"input {tensor.name!r} has shape {tensor.shape} ({count} values) but carries {filled}"
        )
    # Parsed as float32, then narrowed: numpy reads FP16 text through a wider float anyway.
    with np.errstate(over="ignore"):  # FP16 beyond its range becomes inf, refused after
        return out.astype(TENSOR_DTYPES[tensor.datatype], copy=False)
