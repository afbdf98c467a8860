"""Admission under overload: how far behind a batcher is (`Backlog`), and the refusal of work
that it would compute only after the work's deadline.

A request is refused (429 with Retry-After, counted as reason "overloaded") when the images
queued ahead of it, at the batcher's measured batch time, would take it past its deadline:
computing it would spend a batch on an answer nobody reads, and every request behind it would
wait longer for nothing. The HTTP workers check before decoding (from the backlog the engine
process sends with each answer), the batcher again on arrival and when it takes each row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import Counter

from service.errors import DeadlineExceededError, OverloadedError

# Admission keeps this fraction of a request's time left in reserve, and at least RESERVE_BATCHES
# batches (see Backlog.admits). At 10% and one batch, a 2 s deadline kept 0.2 s: one stall of
# the host longer than that under 3x overload (CI, 2 shared cores) let admitted rows expire
# in the queue (504). A quarter keeps 0.5 s there and still queues 1.5 s of batches, enough
# that the device never waits.
ADMIT_MARGIN = 0.25
RESERVE_BATCHES = 2


@dataclass(frozen=True)
class Backlog:
    """How far behind a batcher is: when the images queued now should all be computed
    (`clear_at`, time.monotonic()) and how long one batch of up to `max_batch` takes. The
    engine process sends it with every answer, so that an HTTP worker can refuse a request
    that cannot make its deadline before it decodes a single image."""

    clear_at: float
    batch_s: float
    max_batch: int

    def finish_at(self, rows: int, now: float) -> float:
        """When `rows` more images would be computed, queued behind the backlog."""
        return max(now, self.clear_at) + -(-rows // self.max_batch) * self.batch_s

    def idle(self, now: float) -> bool:
        """Nothing queued ahead: a new request waits for no one."""
        return self.clear_at <= now

    def after(self, rows: int, now: float) -> Backlog:
        """This backlog with `rows` more queued behind it."""
        return Backlog(self.finish_at(rows, now), self.batch_s, self.max_batch)

    def admits(self, rows: int, deadline: float, now: float) -> bool:
        """True when `rows` would be computed by `deadline` with time to spare:
        RESERVE_BATCHES batches, or ADMIT_MARGIN of the time left if more (the estimate is a
        running mean, and rows admitted at the very edge would often miss). With nothing
        queued ahead there is no one to wait for, and the only question is whether the rows'
        own batches fit."""
        if self.idle(now):
            return self.finish_at(rows, now) <= deadline
        spare = max(RESERVE_BATCHES * self.batch_s, ADMIT_MARGIN * (deadline - now))
        return self.finish_at(rows, now) + spare <= deadline


def overloaded(
    model: str, backend: str, backlog: Backlog, rows: int, deadline: float, retry_after_s: int
) -> OverloadedError | DeadlineExceededError:
    """The refusal of rows that `backlog` would compute only after their deadline: 429 when
    other work is ahead of them (a retry later may fit), 504 when the server is idle and the
    deadline is shorter than the rows' own batches (a retry would fail the same way)."""
    now = time.monotonic()
    wait_ms = (backlog.finish_at(rows, now) - now) * 1e3
    if backlog.idle(now):
        return DeadlineExceededError(
            f"the request's deadline ({max(0.0, deadline - now) * 1e3:.0f} ms) is shorter than "
            f"computing it takes on {model!r} ({backend}), about {wait_ms:.0f} ms; raise the V2 "
            "`timeout` parameter or ESCORT_REQUEST_TIMEOUT_S"
        )
    return OverloadedError(
        f"model {model!r} ({backend}) is overloaded: this request would be computed in about "
        f"{wait_ms:.0f} ms, past its deadline in {max(0.0, deadline - now) * 1e3:.0f} ms; "
        "retry later",
        retry_after_s,
    )


def admit(
    backlog: Backlog,
    model: str,
    backend: str,
    rows: int,
    deadline: float,
    retry_after_s: int,
    rejected: Counter,
) -> None:
    """Raise the refusal (`overloaded`), counted in `rejected` (escort_rejected_total) as
    reason "overloaded", when `backlog` would compute `rows` only after `deadline`."""
    if not backlog.admits(rows, deadline, time.monotonic()):
        rejected.labels(model, "overloaded").inc()
        raise overloaded(model, backend, backlog, rows, deadline, retry_after_s)
