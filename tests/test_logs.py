"""service.logs: the one line format, uvicorn's loggers through it, one-line configuration
errors, ignored exceptions; and engine._Progress, which logs instead of drawing a bar when
stderr is not a terminal."""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from service import logs
from service.engine.errors import BackendUnavailableError, UnknownModelError

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """logs.configure for a worker, writing into a buffer; the logging state (and pytest's
    own handlers) put back afterwards."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)  # configure resolves ext://sys.stderr now
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(logs, "_role", logs._role)
    root = logging.getLogger()
    saved_root = (root.level, root.handlers[:])
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "escort.test")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    logs.configure(logs.worker_role(3), "info")
    try:
        yield stream
    finally:
        logging.captureWarnings(False)
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        for name, (level, propagate) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).propagate = propagate


def _record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_line_has_timestamp_level_role_and_logger() -> None:
    line = logs.LineFormatter("engine").format(_record("escort.x", logging.WARNING, "hi %d", 5))
    assert re.fullmatch(TIMESTAMP + r" WARNING \[engine\] escort\.x: hi 5", line), line


def test_uvicorn_error_is_shown_as_uvicorn() -> None:
    # uvicorn logs "Started server process" as uvicorn.error, which reads like an error.
    line = logs.LineFormatter("worker 0").format(_record("uvicorn.error", logging.INFO, "up"))
    assert line.endswith(" INFO [worker 0] uvicorn: up")


def test_configure_formats_every_logger_with_the_role(configured: io.StringIO) -> None:
    logging.getLogger("escort.test").info("from the service")
    logging.getLogger("escort.test").debug("below the level")
    access = logging.getLogger("uvicorn.access")
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v2", "1.1", 200)
    lines = configured.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.match(TIMESTAMP + r" INFO \[worker 3\] escort\.test: from the service$", lines[0])
    assert lines[1].endswith(' [worker 3] uvicorn.access: 127.0.0.1:5000 - "GET /v2 HTTP/1.1" 200')


def test_uvicorn_log_config_keeps_the_format(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging.config

    # pytest's capture took sys.stderr back between the fixture and the test.
    monkeypatch.setattr(sys, "stderr", configured)
    # What uvicorn.Config does with the log_config that serve() gives it.
    logging.config.dictConfig(logs.uvicorn_log_config("warning"))
    logging.getLogger("uvicorn.error").info("hidden at warning")
    logging.getLogger("uvicorn.error").warning("shown")
    (line,) = configured.getvalue().splitlines()
    assert re.match(TIMESTAMP + r" WARNING \[worker 3\] uvicorn: shown$", line)


def test_serve_hands_uvicorn_the_log_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    import service.app
    import service.core.http_server

    given: dict = {}

    class Stop(Exception):
        pass

    def fake_server(config: uvicorn.Config, app: object) -> None:
        given["log_config"] = config.log_config
        raise Stop

    monkeypatch.setattr(service.core.http_server, "DrainingServer", fake_server)
    with pytest.raises(Stop):
        service.core.http_server.serve(object(), service.app.load_settings(log_level="error"))  # type: ignore[arg-type]
    assert given["log_config"]["root"]["level"] == "ERROR"
    assert set(given["log_config"]["loggers"]) >= {"uvicorn", "uvicorn.access"}


def test_configure_turns_tqdm_off_without_a_terminal(configured: io.StringIO) -> None:
    import os

    assert os.environ.get("TQDM_DISABLE") == "1"  # StringIO is no terminal
    from tqdm import tqdm

    with tqdm(total=2) as bar:
        bar.update(2)
    assert configured.getvalue() == ""


def test_warnings_are_log_lines(configured: io.StringIO) -> None:
    import warnings

    warnings.warn("mind the gap", UserWarning, stacklevel=1)
    text = configured.getvalue()
    assert re.match(TIMESTAMP + r" WARNING \[worker 3\] py\.warnings: ", text)
    assert "mind the gap" in text


def test_ignored_exceptions_are_one_log_line(configured: io.StringIO) -> None:
    class Leaky:
        def __del__(self) -> None:
            raise BufferError("cannot close exported pointers exist")

    leaky = Leaky()
    del leaky
    lines = configured.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert re.match(TIMESTAMP + r" WARNING \[worker 3\] escort\.unraisable: Exception ", lines[0])
    assert "BufferError: cannot close exported pointers exist" in lines[0]


@pytest.mark.parametrize(
    "exc",
    [
        BackendUnavailableError("device 'cuda' asked for, but torch sees no CUDA GPU"),
        UnknownModelError("x-net", ["a-net"]),
        ValueError("bad spec"),
        FileNotFoundError("weights.pth"),
    ],
)
def test_configuration_errors_are_one_line(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    # BackendUnavailableError is a RuntimeError too; it must still count as a setup mistake.
    assert logs.is_config_error(exc)
    with caplog.at_level(logging.ERROR):
        logs.log_failure(logging.getLogger("escort.test"), "could not load the models", exc)
    (record,) = caplog.records
    assert record.exc_info is None
    assert record.getMessage() == f"could not load the models: {exc}"
    assert "\n" not in record.getMessage()


def test_other_errors_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise TypeError("a bug")
    except TypeError as exc:
        assert not logs.is_config_error(exc)
        with caplog.at_level(logging.ERROR):
            logs.log_failure(logging.getLogger("escort.test"), "could not load", exc)
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.getMessage() == "could not load: TypeError: a bug"


# --- engine._Progress ---------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_logs_steps_when_stderr_is_a_file(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.engine.engine import _Progress

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with caplog.at_level(logging.INFO, logger="service.engine.engine"):
        bar = _Progress(2, enabled=True)
        bar.note("net: loading weights")  # too soon after the start for a line of its own
        bar.step("net: loaded")
        bar.step("net/dense: built")
        bar.close()
    assert bar.bar is None
    assert [r.getMessage() for r in caplog.records] == [
        "loading models 1/2: net: loaded",
        "loading models 2/2: net/dense: built",
    ]
    assert stream.getvalue() == ""  # nothing drawn: no "\r", no escape codes


def test_progress_notes_show_up_now_and_then(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.engine import engine

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="service.engine.engine"):
        bar = engine._Progress(4, enabled=True)
        bar.note("tuning 1/50")
        bar.last_line -= engine._Progress.NOTE_EVERY_S  # as if that long had passed
        bar.note("tuning 30/50")
        bar.note("tuning 31/50")
    assert [r.getMessage() for r in caplog.records] == ["loading models 0/4: tuning 30/50"]


def test_progress_draws_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    from service.engine.engine import _Progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = _Progress(2, enabled=True)
    assert bar.bar is not None
    bar.step("net: loaded")
    bar.close()
    assert "loading models" in terminal.getvalue()


def test_progress_off_is_silent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.engine.engine import _Progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.DEBUG):
        bar = _Progress(1, enabled=False)
        bar.step("net: loaded")
        bar.close()
    assert bar.bar is None and not caplog.records
