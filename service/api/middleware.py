"""ASGI middleware: the request size limit, the request metrics of the inference routes, and
admission during a drain (new work refused, work in flight answered 503 at the deadline).

Pure ASGI rather than BaseHTTPMiddleware, so that bodies stream through untouched and a
client's disconnect still reaches the route.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from service.api.deps import BACKEND_SCOPE_KEY, too_large
from service.errors import ServiceError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_INFERENCE_PATHS = (
    ("v1", re.compile(r"^/v1/models/([^/]+)/classify/?$")),
    ("v2", re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer/?$")),
)


def _inference_route(path: str) -> tuple[str, str] | None:
    for protocol, pattern in _INFERENCE_PATHS:
        match = pattern.match(path)
        if match:
            return protocol, match.group(1)
    return None


CLIENT_CLOSED = 499  # nginx's code: the client left before the answer


async def _send_json(send: Send, status: int, payload: dict[str, Any], headers: dict[str, str]):
    body = json.dumps(payload).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send: Send, error: ServiceError) -> None:
    """A 503 that closes the connection (the drain). The body the client may still be sending
    is read and dropped by the HTTP protocol's lingering close (service/core/http_protocol.py),
    so the close never resets the answer."""
    headers = {**error.headers, "Connection": "close"}
    await _send_json(send, error.status_code, {"error": error.message}, headers)


def _requests_of(app: Any) -> set[asyncio.Timeout]:
    """The deadlines of the inference requests in flight in `app`, one registry per app."""
    running = getattr(app.state, "escort_running_requests", None)
    if running is None:
        running = app.state.escort_running_requests = set()
    return running


def abort_requests(app: Any) -> int:
    """The drain's deadline: every inference request still in flight in `app` stops now and
    is answered 503 (Retry-After) if its answer has not begun. How many were stopped."""
    running = _requests_of(app)
    now = asyncio.get_running_loop().time()
    for deadline in running:
        deadline.reschedule(now)
    return len(running)


class ServiceMiddleware:
    """Refuses bodies over the limit (from Content-Length before reading, and while reading)
    and records escort_requests_total / escort_request_duration_seconds for inference.

    While the server drains, new inference requests get 503 + Retry-After, every answer says
    `Connection: close` (so that keep-alive clients move to another replica instead of
    sending on a connection that is about to close), and `abort_requests` answers those
    still in flight 503 at the drain's deadline. A client that leaves before its answer
    counts as 499, whatever the route made of the missing body."""

    def __init__(self, app: ASGIApp, state_of: Callable[[Scope], Any]) -> None:
        self.app = app
        self._state_of = state_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self._state_of(scope)
        if state is None:  # before the lifespan has run
            await self.app(scope, receive, send)
            return
        limit = state.settings.max_request_bytes
        route = _inference_route(scope.get("path", ""))
        start = time.monotonic()
        status = {"code": 500, "started": False, "client_left": False}

        async def send_tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                headers = list(message.get("headers", ()))
                if state.draining and (b"connection", b"close") not in headers:
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        async def receive_tracking() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not status["started"]:
                status["client_left"] = True
            return message

        try:
            if self._declared_length(scope) > limit:
                error = too_large(limit)
                await _send_json(send_tracking, 413, {"error": error.message}, error.headers)
                return
            if route is None:
                await self.app(scope, self._limited(receive, limit), send_tracking)
                return
            if state.draining:
                # Decided at admission: requests already inside finish, new ones are refused.
                error = state.refuse_while_draining(route[1])
                await _refuse(send_tracking, error)
                return
            async with state.tracked():  # a drain waits for these
                await self._run_until_aborted(scope, receive_tracking, send_tracking, status)
        except ClientDisconnect:
            if not status["client_left"]:
                raise
            # Nobody to answer: the route's error for the missing body goes nowhere.
        finally:
            if status["client_left"]:
                status["code"] = CLIENT_CLOSED
            if route is not None:
                protocol, model = route
                label = state.model_label(model)
                backend = scope.get(BACKEND_SCOPE_KEY) or "none"
                metrics = state.metrics
                metrics.requests.labels(label, backend, protocol, str(status["code"])).inc()
                if label != "unknown":
                    metrics.request_duration.labels(label, backend).observe(
                        time.monotonic() - start
                    )

    async def _run_until_aborted(
        self, scope: Scope, receive: Receive, send: Send, status: dict[str, Any]
    ) -> None:
        state = self._state_of(scope)
        running = _requests_of(scope["app"])
        limited = self._limited(receive, state.settings.max_request_bytes)
        try:
            async with asyncio.timeout(None) as deadline:
                running.add(deadline)
                await self.app(scope, limited, send)
        except TimeoutError:
            if not deadline.expired():
                raise  # the route's own, not the drain's
            if status["started"]:
                return  # too late for another answer; the connection closes unfinished
            error = state.refuse_while_draining(_inference_route(scope["path"])[1])
            await _refuse(send, error)
        finally:
            running.discard(deadline)

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    @staticmethod
    def _limited(receive: Receive, limit: int) -> Receive:
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        return receive_limited
