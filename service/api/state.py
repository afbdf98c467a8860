"""What the routes share while the app runs: the models, the dispatcher, readiness.

This is the transport-free dataplane: the routes parse a request and make one call,
`ServiceState.classify_images` or `classify_tensor`, which checks readiness, preprocesses
and submits to the Dispatcher (the engine here, or in the engine core process).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batching import Timeline, loop_time
from service.config import Settings
from service.dispatch import BatchTotals, Dispatcher
from service.engine.manifest import list_manifests
from service.engine.protocol import ModelDescription
from service.errors import (
    BadImageError,
    BadInputError,
    DeadlineExceededError,
    ForbiddenError,
    ModelNotFoundError,
    NotFoundError,
    NotReadyError,
    ShuttingDownError,
    UnknownBackendError,
)
from service.metrics import ServiceMetrics
from service.preprocess import Preprocessor, engine_decodable

log = logging.getLogger("escort.app")

# A model name the repository API takes: a manifest's file name, never a path.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]{1,9})?")


@dataclass
class _Outcomes:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0


class ServiceState:
    """Readiness, models and dispatcher of one app; created in the lifespan, on app.state."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        preprocessor: Preprocessor,
        expected_models: tuple[str, ...],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.preprocessor = preprocessor
        self.expected_models = expected_models
        self.dispatcher: Dispatcher | None = None
        self.models: dict[str, ModelDescription] = {}
        self.ready = False
        self.draining = False
        self.drain_deadline = 0.0  # time.monotonic(); set by begin_drain
        self.load_error: str | None = None
        # Called when loading fails, so that a server process stops instead of idling unready.
        self.on_load_failure: Callable[[], None] | None = None
        self.inflight = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._outcomes: dict[str, _Outcomes] = {}
        self._slow_said = 0.0  # when a slow round trip was last logged

    # -- readiness and lifecycle ------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "the server is shutting down"
        if self.load_error:
            return f"model loading failed: {self.load_error}"
        if not self.ready:
            return "models are still loading and warming up"
        return None

    def begin_drain(self) -> None:
        """Readiness goes false and new work is refused; work in flight carries on until
        `drain_deadline` (ESCORT_DRAIN_TIMEOUT_S from the first call: one budget)."""
        if not self.draining:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        self.draining = True

    def drain_left_s(self) -> float:
        """What is left of the drain's budget (the whole budget before a drain began)."""
        if not self.draining:
            return self.settings.drain_timeout_s
        return max(0.0, self.drain_deadline - time.monotonic())

    async def wait_quiet(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False when the timeout ran out first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._quiet.wait()
        except TimeoutError:
            return False
        return True

    @asynccontextmanager
    async def tracked(self) -> AsyncIterator[None]:
        """Count a request in flight for as long as it runs, so a drain can wait for it."""
        self.inflight += 1
        self._quiet.clear()
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            if self.inflight == 0:
                self._quiet.set()

    # -- the model repository -------------------------------------------------------------

    def set_models(self, models: dict[str, ModelDescription]) -> None:
        """The served models changed (a load or an unload, asked of any worker)."""
        for name, desc in models.items():
            if name not in self.models:
                self.metrics.prepare_model(name, desc.backends, desc.layer_sparsity)
                self.metrics.model_ready.labels(name).set(1)
        for name in set(self.models) - set(models):
            self.metrics.model_ready.labels(name).set(0)
        self.models = dict(models)
        self.expected_models = tuple(models)  # an unloaded model is unknown, not loading

    def _repository_dispatcher(self, name: str | None = None) -> Dispatcher:
        if not self.settings.repository_api:
            raise ForbiddenError(
                "the model repository API is off; set ESCORT_REPOSITORY_API=true to load and "
                "unload models at run time"
            )
        if name is not None and (not MODEL_NAME.fullmatch(name) or ".." in name):
            raise BadInputError(
                f"{name!r} is not a model name: letters, digits, '.', '_' and '-' (and '@N' for "
                "a version), naming a manifest in the models folders"
            )
        if self.draining:
            raise self.refuse_while_draining(name or "unknown")
        if not self.ready or self.dispatcher is None:
            raise NotReadyError(self.not_ready_reason() or "not ready", self.settings.retry_after_s)
        return self.dispatcher

    async def load_model(self, name: str) -> None:
        """Load a manifest from the models folders (ESCORT_MODELS_DIR, then the shipped ones)
        beside the served models; loaded already: nothing to do."""
        dispatcher = self._repository_dispatcher(name)
        available = list_manifests(self.settings.models_dir)
        if name not in available and name not in self.models:
            raise ModelNotFoundError(
                f"no manifest {name!r} in the models folders; available: "
                f"{', '.join(available) or 'none'}"
            )
        self.set_models(await dispatcher.load(name))

    async def unload_model(self, name: str) -> None:
        """Stop serving a model (every version of it, or the one its "@N" names): new requests
        get 404 at once, its queued ones finish first."""
        dispatcher = self._repository_dispatcher(name)
        keys = [name] if name in self.models else [d.name for d in self.versions(name)]
        if not keys:
            served = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {served}")
        for key in keys:
            self.set_models(await dispatcher.unload(key))

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's index: the served models READY, the other manifests UNAVAILABLE."""
        self._repository_dispatcher()
        rows = [
            {"name": d.model_name, "version": d.version, "state": "READY"}
            for d in sorted(self.models.values(), key=lambda d: (d.model_name, d.version))
        ]
        if not ready_only:
            for stem in list_manifests(self.settings.models_dir):
                if stem not in self.models:
                    model, _, version = stem.partition("@")
                    rows.append({"name": model, "version": version or "1",
                                 "state": "UNAVAILABLE", "reason": f"not loaded ({stem})"})  # fmt: skip
        return rows

    # -- lookups --------------------------------------------------------------------------

    def versions(self, name: str) -> list[ModelDescription]:
        """The served versions of a model (its clients' name), oldest first."""
        found = [d for d in self.models.values() if d.model_name == name]
        return sorted(found, key=lambda d: int(d.version) if d.version.isdigit() else 0)

    def describe(self, name: str, version: str | None = None) -> ModelDescription:
        """A model's description: the version asked for, else its latest served one; 404 if
        it is not served (or not in that version), 503 while it loads."""
        versions = self.versions(name)
        if versions:
            if not version:
                return versions[-1]
            for desc in versions:
                if desc.version == version:
                    return desc
            have = ", ".join(d.version for d in versions)
            raise NotFoundError(f"model {name!r} has no version {version!r}; it has {have}")
        if name in self.models and not version:  # a manifest name with its "@N"
            return self.models[name]
        if name in self.expected_models and not self.load_error:
            raise NotReadyError(
                f"model {name!r} is still loading; retry shortly", self.settings.retry_after_s
            )
        served = ", ".join(self.models or self.expected_models) or "none"
        raise ModelNotFoundError(f"unknown model {name!r}; this server serves: {served}")

    def model_label(self, name: str) -> str:
        """The metrics label for a model named in a path: only served names pass through."""
        if name in self.models or name in self.expected_models or self.versions(name):
            return name
        return "unknown"

    def resolve_backend(self, model: ModelDescription, requested: str | None) -> str:
        if requested is None or requested == "":
            return model.backends[0]
        if not isinstance(requested, str) or requested not in model.backends:
            raise UnknownBackendError(
                f"backend {requested!r} is not loaded for {model.name!r}; loaded: "
                f"{', '.join(model.backends)} (ESCORT_BACKENDS keeps several loaded)"
            )
        return requested

    def observe_stage(self, model: str, backend: str, stage: str, seconds: float) -> None:
        """A stage of this request's path in this process (receive, parse, encode)."""
        self.metrics.observe_stage(model, backend, stage, seconds)

    def deadline(self, timeout_s: float | None = None) -> float:
        """A monotonic deadline: the server's timeout, shortened by the client's if given."""
        limit = self.settings.request_timeout_s
        if timeout_s is not None and timeout_s > 0:
            limit = min(limit, timeout_s)
        return time.monotonic() + limit

    def _count_refusal(self, model: str, reason: str) -> None:
        self.metrics.rejected.labels(model, reason).inc()

    def refuse_while_draining(self, model: str) -> ShuttingDownError:
        """The error for an inference request that arrives after the drain began."""
        self._count_refusal(self.model_label(model), "shutting_down")
        return ShuttingDownError(
            "the server is shutting down; retry on another replica", self.settings.retry_after_s
        )

    def _dispatcher(self, model: ModelDescription) -> Dispatcher:
        # Draining is checked at admission (middleware): requests admitted before it finish.
        if not self.ready or self.dispatcher is None:
            self._count_refusal(model.name, "not_ready")
            raise NotReadyError(self.not_ready_reason() or "not ready", self.settings.retry_after_s)
        return self.dispatcher

    def _check_count(self, count: int) -> None:
        if count < 1:
            raise BadInputError("the request carries no images")
        if count > self.settings.max_images_per_request:
            raise BadInputError(
                f"the request carries {count} images; at most "
                f"{self.settings.max_images_per_request} per request "
                "(ESCORT_MAX_IMAGES_PER_REQUEST); split it"
            )

    # -- the inference path ---------------------------------------------------------------

    async def classify_images(
        self, model: ModelDescription, backend: str, images: list[bytes], deadline: float
    ) -> np.ndarray:
        """Encoded images -> probabilities [N, classes]."""
        self._check_count(len(images))
        dispatcher = self._dispatcher(model)
        # Before a single image is decoded: work the queue cannot finish in time is refused.
        dispatcher.admit(model.name, backend, len(images), deadline)
        async with self._outcome(model.name):
            if self._decode_in_engine(model, dispatcher, images):
                return await self._classify_encoded(model, backend, images, deadline, dispatcher)
            batch = await self._decode(model, images, deadline)
            return await self._submit(dispatcher, model, backend, batch, deadline)

    async def _decode(self, model: ModelDescription, images: list[bytes], deadline: float):
        """The images decoded, within the request's deadline: the deadline covers decode as
        well as queue and compute (a decode that overruns it still ends in its thread, but
        the request is answered at the deadline and its rows never reach a batch)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop_time(loop, deadline)):
                return await self.preprocessor.images_to_batch(
                    model.name, images, model.preprocessing
                )
        except TimeoutError:
            self._count_refusal(model.name, "deadline")
            raise DeadlineExceededError(
                "the request's deadline passed while its images were decoded; send smaller "
                "images, raise the V2 `timeout` parameter or ESCORT_REQUEST_TIMEOUT_S"
            ) from None

    def _decode_in_engine(
        self, model: ModelDescription, dispatcher: Dispatcher, images: list[bytes]
    ) -> bool:
        mode = self.settings.image_decode
        if mode == "workers" or not model.decodes_images:
            return False
        if mode == "auto" and not model.device.startswith("cuda"):
            return False  # on a CPU the engine's one thread would decode what many workers can
        limit, capacity = self.settings.max_image_pixels, dispatcher.row_capacity()
        return all(engine_decodable(data, limit, capacity) for data in images)

    async def _classify_encoded(
        self,
        model: ModelDescription,
        backend: str,
        images: list[bytes],
        deadline: float,
        dispatcher: Dispatcher,
    ) -> np.ndarray:
        """The photos go to the engine encoded; it decodes them in its batch, on its device."""
        rows = [np.frombuffer(data, dtype=np.uint8) for data in images]
        probabilities = await self._submit(dispatcher, model, backend, rows, deadline)
        failed = np.flatnonzero(np.isnan(probabilities).any(axis=1))
        if failed.size:
            where = f"image {failed[0] + 1}: " if len(images) > 1 else ""
            raise BadImageError(
                f"{where}image data is truncated or corrupt (the JPEG did not decode)"
            )
        return probabilities

    async def classify_tensor(
        self, model: ModelDescription, backend: str, tensor: np.ndarray, deadline: float
    ) -> np.ndarray:
        """A preprocessed float [N, 3, H, W] tensor -> probabilities [N, classes]."""
        self._check_count(int(tensor.shape[0]))
        dispatcher = self._dispatcher(model)
        dispatcher.admit(model.name, backend, int(tensor.shape[0]), deadline)
        async with self._outcome(model.name):
            return await self._submit(dispatcher, model, backend, tensor, deadline)

    async def _submit(
        self,
        dispatcher: Dispatcher,
        model: ModelDescription,
        backend: str,
        rows: Any,
        deadline: float,
    ) -> np.ndarray:
        """The dispatcher's round trip, timed as stages: "dispatch" (from handing the rows over
        to having their answers), and within it "to_engine" (until the batcher queued them)
        and "back" (from their batch's answers on the engine's host to here), the hand-offs
        between this worker, the engine process and its threads. A round trip longer than
        ESCORT_SLOW_REQUEST_MS is logged with its parts (at most one line a second)."""
        timeline = Timeline()
        started = time.monotonic()
        result = await dispatcher.submit(model.name, backend, rows, deadline, timeline)
        ended = time.monotonic()
        self.observe_stage(model.name, backend, "dispatch", ended - started)
        if timeline.finished:
            self.observe_stage(model.name, backend, "to_engine", timeline.enqueued - started)
            self.observe_stage(model.name, backend, "back", ended - timeline.finished)
            slow_s = self.settings.slow_request_ms / 1000.0
            if slow_s and ended - started >= slow_s and ended - self._slow_said >= 1.0:
                self._slow_said = ended
                log.warning(
                    "slow request on %s/%s: engine round trip %.1f ms = to engine %.1f + queue "
                    "%.1f + wait %.1f + batch %.1f + back %.1f",
                    model.name, backend, (ended - started) * 1e3,
                    (timeline.enqueued - started) * 1e3, (timeline.taken - timeline.enqueued) * 1e3,
                    (timeline.began - timeline.taken) * 1e3, (timeline.finished - timeline.began) * 1e3,
                    (ended - timeline.finished) * 1e3,
                )  # fmt: skip
        return result

    @asynccontextmanager
    async def _outcome(self, model: str) -> AsyncIterator[None]:
        outcomes = self._outcomes.setdefault(model, _Outcomes())
        start = time.monotonic_ns()
        try:
            yield
        except BaseException:
            outcomes.fail_count += 1
            outcomes.fail_ns += time.monotonic_ns() - start
            raise
        outcomes.success_count += 1
        outcomes.success_ns += time.monotonic_ns() - start
        outcomes.last_inference_ms = int(time.time() * 1000)

    async def statistics(self, desc: ModelDescription) -> dict[str, Any]:
        """The model version's counters in the shape of Triton's statistics extension. The
        request outcomes are this process's; the batch totals are the engine's."""
        outcomes = self._outcomes.get(desc.name, _Outcomes())
        totals = await self.dispatcher.totals(desc.name) if self.dispatcher else BatchTotals()
        images = totals.images

        def pair(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        return {
            "name": desc.model_name,
            "version": desc.version,
            "last_inference": outcomes.last_inference_ms,
            "inference_count": images,
            "execution_count": totals.batches,
            "inference_stats": {
                "success": pair(outcomes.success_count, outcomes.success_ns),
                "fail": pair(outcomes.fail_count, outcomes.fail_ns),
                "queue": pair(images, totals.queue_ns),
                "compute_input": pair(images, 0),
                "compute_infer": pair(images, totals.compute_ns),
                "compute_output": pair(images, 0),
                "cache_hit": pair(0, 0),
                "cache_miss": pair(0, 0),
            },
            "batch_stats": [],
        }


def top_k(probabilities: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per row, the k best (class index, score), best first; ties keep the lower index first."""
    k = max(1, min(k, probabilities.shape[1]))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [(int(i), float(row[i])) for i in indices]
        for row, indices in zip(probabilities, order, strict=True)
    ]
