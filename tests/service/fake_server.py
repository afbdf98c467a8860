"""A server with the fake engine, for tests that need a process of its own (signals, drain):
`python -m tests.service.fake_server`. It runs the real process layout (supervisor, engine
core process, HTTP workers) with the fake engine inside the engine process. Settings come
from ESCORT_* variables; FAKE_DELAY_S slows batches, FAKE_LOAD_S a model's load; FAKE_PIN=1
runs `PrefetchCheckingEngine`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from service import logs
from service.config import Settings, load_settings
from service.core.supervisor import run_service
from service.metrics import ServiceMetrics
from tests.service.fakes import FakeEngine


class PrefetchCheckingEngine(FakeEngine):
    """Says it page-locks the arenas, as a GPU engine does, and fails any batch with a row
    that the engine process did not hand to `prefetch_rows` first (so a request answers 500)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prefetched: set[int] = set()

    def pin_host_memory(self, address: int, size: int) -> bool:
        return True

    def prefetch_rows(self, rows: Sequence[np.ndarray]) -> None:
        self.prefetched.update(row.ctypes.data for row in rows)

    def infer_rows(self, model: str, backend: str, rows: Sequence[np.ndarray]) -> np.ndarray:
        missing = [i for i, row in enumerate(rows) if row.ctypes.data not in self.prefetched]
        if missing:
            raise RuntimeError(f"rows {missing} of the batch were not prefetched")
        self.prefetched.difference_update(row.ctypes.data for row in rows)
        return super().infer_rows(model, backend, rows)


def fake_engine(settings: Settings, metrics: ServiceMetrics) -> FakeEngine:
    """Runs in the engine process (the supervisor passes it there by name)."""
    kind = PrefetchCheckingEngine if os.environ.get("FAKE_PIN") == "1" else FakeEngine
    return kind(
        backends=settings.loaded_backends,
        delay_s=float(os.environ.get("FAKE_DELAY_S", "0")),
        load_delay_s=float(os.environ.get("FAKE_LOAD_S", "0")),
    )


def main() -> int:
    settings = load_settings()
    logs.configure(logs.SUPERVISOR, settings.log_level)
    return run_service(settings, engine_factory=fake_engine)


if __name__ == "__main__":
    sys.exit(main())
