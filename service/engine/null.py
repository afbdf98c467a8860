"""NullEngine: serves the configured models' routes without computing anything.

Like Triton's identity models, it exists to measure the serving path on its own: requests are
received, parsed, preprocessed, batched, passed to the engine process and answered exactly as
with a real model, but a batch costs only the allocation of its uniform probabilities. The
HTTP ceiling it gives is what the load-test report sets beside the real model's throughput.
`ESCORT_ENGINE=null` selects it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.config import Settings
from service.engine.errors import UnknownBackendError, UnknownModelError
from service.engine.manifest import load_manifest
from service.engine.protocol import Engine, ModelDescription


class NullEngine(Engine):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._models: dict[str, ModelDescription] = {}
        for name in settings.models:
            self.load_model(name)

    def load_model(self, name: str) -> ModelDescription:
        settings = self._settings
        manifest = load_manifest(name, settings.models_dir)
        desc = ModelDescription(
            name=manifest.name,
            version=str(manifest.version),
            architecture=f"null ({manifest.architecture} not loaded)",
            labels=tuple(manifest.labels),
            preprocessing=manifest.preprocessing,
            backends=settings.loaded_backends,
            max_batch_size=settings.max_batch_size,
            device="none",
            precision=settings.precision,
            card={"engine": "null: answers uniform probabilities, computes nothing"},
        )
        self._models[manifest.name] = desc
        return desc

    def unload_model(self, name: str) -> None:
        self._models.pop(name, None)

    def describe(self) -> dict[str, ModelDescription]:
        return dict(self._models)

    def infer(self, model: str, backend: str, batch: np.ndarray) -> np.ndarray:
        return self.infer_rows(model, backend, batch)

    def infer_rows(self, model: str, backend: str, rows: Sequence[np.ndarray]) -> np.ndarray:
        desc = self._models.get(model)
        if desc is None:
            raise UnknownModelError(model, self._models)
        if backend not in desc.backends:
            raise UnknownBackendError(model, backend, desc.backends)
        classes = desc.num_classes
        return np.full((len(rows), classes), 1.0 / classes, dtype=np.float32)
