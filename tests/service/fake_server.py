"""A server with the fake engine, for tests that need a process of its own (signals, drain):
`python -m tests.service.fake_server`. It runs the real process layout (supervisor, engine
core process, HTTP workers) with the fake engine inside the engine process. Settings come
from ESCORT_* variables; FAKE_DELAY_S slows batches, FAKE_LOAD_S a model's load."""

from __future__ import annotations

import os
import sys

from service import logs
from service.config import Settings, load_settings
from service.core.supervisor import run_service
from service.metrics import ServiceMetrics
from tests.service.fakes import FakeEngine


def fake_engine(settings: Settings, metrics: ServiceMetrics) -> FakeEngine:
    """Runs in the engine process (the supervisor passes it there by name)."""
    return FakeEngine(
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
