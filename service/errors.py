"""Domain errors, each naming its HTTP status, and the one function that maps them to responses.

Every error the service sends is JSON `{"error": "<what was wrong and how to fix it>"}`:
the domain errors below, FastAPI's validation errors (422), unknown routes (404), wrong
methods (405), and anything unexpected (500, logged with its traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("escort.errors")


class ServiceError(Exception):
    """Base of the errors a client sees; `status_code` is the HTTP status."""

    status_code: int = 500

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadInputError(ServiceError):
    """The request's content is wrong: a bad image, tensor, parameter or body."""

    status_code = 400


class BadImageError(BadInputError):
    """An image that cannot be decoded or is too large to decode."""


class BadTensorError(BadInputError):
    """A tensor with the wrong name, shape, datatype or size."""


class UnknownBackendError(BadInputError):
    """A backend that is not loaded; the message lists the loaded ones."""


class UnauthorizedError(ServiceError):
    status_code = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class ForbiddenError(ServiceError):
    """An endpoint this server has turned off (the repository API without its setting)."""

    status_code = 403


class NotFoundError(ServiceError):
    status_code = 404


class ModelNotFoundError(NotFoundError):
    """A model this server does not serve; the message lists the ones it does."""


class PayloadTooLargeError(ServiceError):
    status_code = 413


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415


class SchemaError(ServiceError):
    """A JSON body that parses but does not have the expected fields and types."""

    status_code = 422


class UnavailableError(ServiceError):
    """The server cannot take the request now; clients should retry after `retry_after_s`."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, {"Retry-After": str(max(0, int(retry_after_s)))})


class QueueFullError(UnavailableError):
    """The model's queue is full."""


class ShuttingDownError(UnavailableError):
    """The server is draining before it exits."""


class NotReadyError(UnavailableError):
    """Models are still loading or warming up."""


class DeadlineExceededError(ServiceError):
    status_code = 504


class OverloadedError(ServiceError):
    """More work arrives than the server computes: this request would be answered only after
    its deadline. 429 with Retry-After (not a 5xx: the server is healthy, the load is not)."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, {"Retry-After": str(max(0, int(retry_after_s)))})


class RequestTimeoutError(ServiceError):
    """The client did not finish sending its request (headers or body) in time."""

    status_code = 408


class ClientDisconnectedError(ServiceError):
    """The client went away before its answer was ready; nobody reads this response."""

    status_code = 499


class EngineFailureError(ServiceError):
    """The engine failed on a batch; a fault of the server, never of the client."""

    status_code = 500


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None):
    return JSONResponse({"error": message}, status_code=status_code, headers=dict(headers or {}))


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


_ROUTE_ERRORS = {
    404: "no such endpoint; see /docs for the API",
    405: "method not allowed on this endpoint; see /docs for the API",
}


def register_error_handlers(app: FastAPI) -> None:
    """Send every error as JSON {"error": ...} with the status its exception names."""

    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500 and not isinstance(exc, UnavailableError | DeadlineExceededError):
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(exc.status_code, exc.message, exc.headers)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if detail in ("Not Found", "Method Not Allowed"):
            detail = _ROUTE_ERRORS.get(exc.status_code, detail)
        return error_response(exc.status_code, detail, exc.headers)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; the server log has the details")

    app.add_exception_handler(ServiceError, on_service_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
