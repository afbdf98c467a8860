"""Logging for every process of the service, in one format a person can read.

Each record is one line: an ISO 8601 timestamp with milliseconds and the UTC offset, the level,
the role of the process that wrote it (supervisor, engine, worker N) and the logger, e.g.

    2026-12-01T10:13:13.042+00:00 ERROR [engine] escort.engine_process: could not load ...

The supervisor, the engine process and each HTTP worker call `configure` first thing, and
`serve()` hands `uvicorn_log_config` to uvicorn, so that uvicorn's own lines and its access
lines go through the same handler instead of uvicorn's default (which has no timestamp).

Start-up failures are logged by `log_failure`: a configuration mistake (a device that is not
there, an unknown model, a missing file) is one line without a traceback, since the fix is in
the settings, not in the code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from datetime import datetime
from typing import Any

from service.engine.errors import EngineError

SUPERVISOR = "supervisor"
ENGINE = "engine"

# Errors that mean "the settings ask for something this machine or folder cannot give".
# EngineError covers BackendUnavailableError, which is also a RuntimeError.
CONFIG_ERRORS: tuple[type[BaseException], ...] = (EngineError, LookupError, ValueError, OSError)

# uvicorn logs its start and stop lines as "uvicorn.error", which reads like an error.
_SOURCE_NAMES = {"uvicorn.error": "uvicorn"}
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

_role = SUPERVISOR  # this process's role, set by configure(); read by uvicorn_log_config()


def worker_role(index: int) -> str:
    return f"worker {index}"


class LineFormatter(logging.Formatter):
    """One line per record, stamped with the time and the process's role."""

    def __init__(self, role: str) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(role)s] %(source)s: %(message)s")
        self.role = role

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # Local time with its offset: unambiguous in a container log (often UTC) and on a
        # laptop alike, and still sorts as text within one host.
        moment = datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        record.role = self.role
        record.source = _SOURCE_NAMES.get(record.name, record.name)
        return super().format(record)


def log_config(role: str, level: str) -> dict[str, Any]:
    """A logging.config.dictConfig dict: one stderr handler on the root logger, and uvicorn's
    loggers handing their records up to it rather than to handlers of their own."""
    level = level.upper()
    return {
        "version": 1,
        # The escort.* loggers exist already (made at import); they must keep working.
        "disable_existing_loggers": False,
        "formatters": {"line": {"()": LineFormatter, "role": role}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "line",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            name: {"level": level, "handlers": [], "propagate": True} for name in _UVICORN_LOGGERS
        },
    }


def configure(role: str, level: str) -> None:
    """Set up logging for this process; call it before anything logs."""
    global _role
    _role = role
    logging.config.dictConfig(log_config(role, level))
    # warnings.warn output would otherwise reach stderr as two lines without a timestamp.
    logging.captureWarnings(True)
    sys.unraisablehook = _log_unraisable
    if not sys.stderr.isatty():
        # tqdm bars outside the service's own (the pruning bar of a model load) would write
        # "\r" and escape codes into a log file; tqdm reads its defaults from TQDM_* variables.
        os.environ.setdefault("TQDM_DISABLE", "1")


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """Exceptions Python ignores (raised in __del__, typically at exit): one WARNING line, as
    they change nothing, and the traceback at DEBUG for whoever hunts them, instead of the
    default's untimestamped "Exception ignored in" block on stderr."""
    exc = unraisable.exc_value
    where = unraisable.err_msg or "Exception ignored in"
    target = f" {unraisable.object!r}" if unraisable.object is not None else ""
    log = logging.getLogger("escort.unraisable")
    log.warning("%s%s: %s: %s", where, target, type(exc).__name__, exc)
    if exc is not None:
        log.debug("its traceback", exc_info=(type(exc), exc, unraisable.exc_traceback))


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """The log_config for uvicorn.Config: this process's format (uvicorn applies it with
    dictConfig when the server starts, replacing what `configure` set up by the same)."""
    return log_config(_role, level)


def is_config_error(exc: BaseException) -> bool:
    return isinstance(exc, CONFIG_ERRORS)


def log_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log a failure as one line `what: reason` when it is a configuration mistake, else with
    its traceback (a bug, whose traceback is what a report needs)."""
    if is_config_error(exc):
        logger.error("%s: %s", what, exc)
    else:
        logger.error("%s: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
