"""RemoteDispatcher at start-up, against a pipe that plays the engine process."""

from __future__ import annotations

import asyncio
import gc
from multiprocessing import Pipe

from service.config import Settings
from service.core.client import RemoteDispatcher
from service.metrics import ServiceMetrics
from tests.service.fakes import FAKE_MODEL, FakeEngine

OTHER = "fake-net-b"


def test_news_that_arrives_with_the_ready_message_is_the_worker_s_set() -> None:
    """A model loaded while this worker was still starting: its news sits in the pipe behind
    "ready", is read in the same burst and confirmed as seen, and must not be undone by the
    older snapshot in "ready" (the worker answered 404 for the loaded model, seen in CI)."""
    before = FakeEngine().describe()
    after = FakeEngine(models={FAKE_MODEL, OTHER}).describe()
    worker_end, engine_end = Pipe()
    engine_end.send(("ready", before))
    engine_end.send(("models", 0, after, 1))
    told: list[set[str]] = []

    async def scenario() -> set[str]:
        dispatcher = RemoteDispatcher(Settings(worker_slots=2), ServiceMetrics(32), worker_end)
        dispatcher.on_models = lambda models: told.append(set(models))
        models = await dispatcher.start()
        await dispatcher.close()
        return set(models)

    try:
        assert asyncio.run(scenario()) == {FAKE_MODEL, OTHER}
    finally:
        gc.unfreeze()
    assert told == [{FAKE_MODEL, OTHER}]
    kinds = {engine_end.recv()[0] for _ in range(2)}
    assert kinds == {"seen", "hello"}
