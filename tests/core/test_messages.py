"""Errors raised in the engine process reach the HTTP worker as the same error: status and
Retry-After included (an unknown kind would become a 500)."""

from __future__ import annotations

import pytest

from service import errors
from service.core.messages import error_message, rebuild_error

WITH_RETRY = [errors.QueueFullError, errors.OverloadedError, errors.ShuttingDownError,
              errors.NotReadyError, errors.UnavailableError]  # fmt: skip
PLAIN = [errors.BadInputError, errors.BadTensorError, errors.ModelNotFoundError,
         errors.DeadlineExceededError, errors.ClientDisconnectedError]  # fmt: skip


@pytest.mark.parametrize("cls", WITH_RETRY, ids=lambda c: c.__name__)
def test_refusals_keep_their_status_and_retry_after(cls) -> None:
    message = error_message(7, cls("busy", 3))
    rebuilt = rebuild_error(*message[2:5])
    assert type(rebuilt) is cls
    assert rebuilt.status_code == cls.status_code and rebuilt.message == "busy"
    assert rebuilt.headers["Retry-After"] == "3"


@pytest.mark.parametrize("cls", PLAIN, ids=lambda c: c.__name__)
def test_client_errors_keep_their_status(cls) -> None:
    rebuilt = rebuild_error(*error_message(7, cls("no"))[2:5])
    assert type(rebuilt) is cls and rebuilt.status_code == cls.status_code


def test_anything_else_is_an_engine_failure() -> None:
    rebuilt = rebuild_error(*error_message(7, RuntimeError("boom"))[2:5])
    assert isinstance(rebuilt, errors.EngineFailureError) and "boom" in rebuilt.message
