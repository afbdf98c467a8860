"""One guard between torch.fx tracing and the batches that run beside it.

`torch.fx.symbolic_trace` patches `torch.nn.Module.__call__` for the whole process while it
traces; a batch of another model that runs a module meanwhile goes through the tracer and
fails ("module is not installed as a submodule"). That happens when the repository API loads
a model while others serve. So batches run under `GUARD.running()` (shared: any number at
once, as before) and a trace under `GUARD.tracing()` (alone: it waits for the batches running
now, and new ones wait for it; it takes a fraction of a second).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TraceGuard:
    """A readers-writer lock that prefers the writer (the trace), so steady traffic cannot
    keep a load waiting."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._tracing = False
        self._waiting = 0

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._cond:
            while self._tracing or self._waiting:
                self._cond.wait()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if self._running == 0:
                    self._cond.notify_all()

    @contextmanager
    def tracing(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._tracing or self._running:
                self._cond.wait()
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


GUARD = TraceGuard()
