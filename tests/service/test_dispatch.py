"""LocalDispatcher: the engine and its batchers in this process."""

from __future__ import annotations

import asyncio
import gc
import time

import numpy as np

from service.config import Settings
from service.dispatch import LocalDispatcher
from service.metrics import ServiceMetrics
from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor


def test_an_in_process_dispatcher_leaves_the_collector_alone() -> None:
    gc.unfreeze()
    engine = FakeEngine()

    async def scenario() -> np.ndarray:
        dispatcher = LocalDispatcher(Settings(), ServiceMetrics(32), engine)
        models = await dispatcher.start()
        assert FAKE_MODEL in models
        # Only the layout's own processes freeze their heap (engine_process, RemoteDispatcher).
        assert gc.get_freeze_count() == 0
        rows = list(marked_tensor(0.5, rows=2))
        out = await dispatcher.submit(FAKE_MODEL, models[FAKE_MODEL].backends[0], rows,
                                      time.monotonic() + 10)  # fmt: skip
        await dispatcher.close()
        return out

    try:
        out = asyncio.run(scenario())
    finally:
        gc.unfreeze()
    np.testing.assert_allclose(out, engine.reference(marked_tensor(0.5, rows=2)), rtol=1e-6)
