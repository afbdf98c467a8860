"""Fixtures for the service tests: a fake engine, an in-process client, a threaded server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.fakes import FakeEngine
from tests.service.servers import ThreadServer, app_client

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(fake_engine: FakeEngine) -> Iterator[TestClient]:
    with app_client(fake_engine) as test_client:
        fake_engine.calls.clear()  # forget the warm-up batches
        yield test_client


@pytest.fixture
def thread_server(fake_engine: FakeEngine) -> Iterator[ThreadServer]:
    with ThreadServer(fake_engine) as server:
        fake_engine.calls.clear()
        yield server


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in DATA.iterdir()
        if path.is_file() and path.suffix != ".md"
    }
