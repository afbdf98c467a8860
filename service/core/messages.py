"""The messages between an HTTP worker and the engine core process.

Each is a small tuple whose first item names it; rows and outputs never travel in them (they
stay in the worker's SlotArena). Small messages are written to a pipe in one atomic write.

worker -> engine: ("hello", arena_name, slots, in_bytes, out_bytes)
                  ("infer", request_id, model, backend, slots, dtype, deadline, lengths)
                  (lengths: None for tensor rows, byte counts for encoded photos)
                  ("cancel", request_id)
                  ("totals", request_id, model)
                  ("load", request_id, model), ("unload", request_id, model)
                  ("seen", version)   this worker serves that version of the models' news
engine -> worker: ("ready", {model: ModelDescription}) or ("failed", reason)
                  ("done", request_id, classes, times, backlog)   outputs are in the slots;
                  (times: the batcher's Timeline.times(), for the worker's stages)
                  ("error", request_id, kind, message, retry_after_s[, backlog])
                  (backlog: the batcher's Backlog after an infer, or None, so that the
                  worker refuses what would miss its deadline before decoding it)
                  ("totals", request_id, BatchTotals)
                  ("models", 0, {model: ModelDescription}, version)   after a load or
                  unload, to every worker; then, once each has answered "seen", the asking
                  worker's own ("models", request_id, {model: ModelDescription})
supervisor -> engine: ("stop",)
"""

from __future__ import annotations

from typing import Any

from service import errors

# The errors an engine-side failure can come back as; anything else is an EngineFailureError.
_KINDS: dict[str, type[errors.ServiceError]] = {
    cls.__name__: cls
    for cls in (
        errors.BadInputError,
        errors.BadTensorError,
        errors.UnknownBackendError,
        errors.ModelNotFoundError,
        errors.QueueFullError,
        errors.OverloadedError,
        errors.ShuttingDownError,
        errors.NotReadyError,
        errors.UnavailableError,
        errors.DeadlineExceededError,
        errors.ClientDisconnectedError,
        errors.EngineFailureError,
    )
}


def error_message(request_id: int, exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, errors.ServiceError) and type(exc).__name__ in _KINDS:
        retry = int(exc.headers.get("Retry-After", "0") or 0)
        return ("error", request_id, type(exc).__name__, exc.message, retry)
    return ("error", request_id, "EngineFailureError", f"{type(exc).__name__}: {exc}", 0)


def rebuild_error(kind: str, message: str, retry_after_s: int) -> errors.ServiceError:
    cls = _KINDS.get(kind, errors.EngineFailureError)
    if issubclass(cls, errors.UnavailableError | errors.OverloadedError):  # with Retry-After
        return cls(message, retry_after_s)
    return cls(message)
