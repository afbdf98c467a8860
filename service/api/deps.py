"""Request plumbing shared by the routes: the app's state, the bearer token, bounded body
reading, and stopping work whose client has gone."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import zlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from pydantic import SecretStr

from service.api.state import ServiceState
from service.errors import (
    BadInputError,
    ClientDisconnectedError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)

T = TypeVar("T")

# Set by the routes so that the metrics middleware can label the request with its backend.
BACKEND_SCOPE_KEY = "escort.backend"


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def require_api_key(request: Request) -> None:
    """Dependency of the inference routes: a matching `Authorization: Bearer <key>` when
    ESCORT_API_KEY is set."""
    check_api_key(get_state(request).settings.api_key, request.headers.get("authorization", ""))


def check_api_key(expected: SecretStr | None, header: str) -> None:
    """An `Authorization` value (HTTP header or gRPC metadata) against ESCORT_API_KEY, in
    constant time; UnauthorizedError when it is missing or wrong."""
    if expected is None:
        return
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError(
            "this endpoint needs an API key: send the header `Authorization: Bearer <key>`"
        )
    if not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise UnauthorizedError("wrong API key")


def set_backend_label(request: Request, backend: str) -> None:
    request.scope[BACKEND_SCOPE_KEY] = backend


def too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"request body is larger than {limit} bytes (ESCORT_MAX_REQUEST_BYTES); "
        "send fewer or smaller images",
        {"Connection": "close"},
    )


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    # wbits: 16+MAX for gzip framing, MAX for zlib ("deflate" in HTTP means zlib-wrapped).
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)  # bounded: a zip bomb stops at the limit
    except zlib.error as exc:
        raise BadInputError(f"body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise too_large(limit)
    if not inflater.eof:
        raise BadInputError(f"{encoding} body is truncated")
    return out


async def read_body(request: Request) -> bytes:
    """The whole body, at most ESCORT_MAX_REQUEST_BYTES, with gzip or deflate undone."""
    limit = get_state(request).settings.max_request_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _inflate(body, encoding, limit)
    raise UnsupportedMediaTypeError(
        f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
    )


async def _client_gone(request: Request) -> None:
    # After the body is read, the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first, so that its queued images
    are dropped before they take a place in a batch. Call only after the body was read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done and watcher.exception() is None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ClientDisconnectedError("the client disconnected before the answer")
        return await task  # done, or the watcher broke: keep waiting for the work
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
