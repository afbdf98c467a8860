"""A server process with the fake engine, for tests that need signals: `python -m
tests.service.fake_server`. Settings come from ESCORT_* variables; FAKE_DELAY_S slows batches."""

from __future__ import annotations

import logging
import os
import sys

from service.app import create_app, serve
from service.config import load_settings
from tests.service.fakes import FakeEngine


def main() -> int:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper())
    engine = FakeEngine(
        backends=settings.loaded_backends, delay_s=float(os.environ.get("FAKE_DELAY_S", "0"))
    )
    return serve(create_app(settings, engine=engine), settings)


if __name__ == "__main__":
    sys.exit(main())
