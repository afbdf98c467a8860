"""ASGI middleware: the request size limit, and the request metrics of the inference routes.

Pure ASGI rather than BaseHTTPMiddleware, so that bodies stream through untouched and a
client's disconnect still reaches the route.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.api.deps import BACKEND_SCOPE_KEY, too_large

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


async def _send_json(send: Send, status: int, payload: dict[str, Any], headers: dict[str, str]):
    body = json.dumps(payload).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class ServiceMiddleware:
    """Refuses bodies over the limit (from Content-Length before reading, and while reading)
    and records escort_requests_total / escort_request_duration_seconds for inference."""

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
        status = {"code": 500}

        async def send_tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

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
                await _send_json(send_tracking, 503, {"error": error.message}, error.headers)
                return
            async with state.tracked():  # a drain waits for these
                await self.app(scope, self._limited(receive, limit), send_tracking)
        finally:
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
