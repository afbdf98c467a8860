"""A fake Engine (numpy, deterministic, controllable) and helpers shared by the service and
API tests."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.engine.errors import UnknownModelError
from service.engine.protocol import Engine, ModelDescription, Preprocessing

FAKE_MODEL = "fake-net"
# What the fake engine's load_model accepts (the repository API's tests load and unload them).
# "fake-net@2", version 2 of fake-net, answers the classes in reverse order (to tell it apart).
FAKE_LOADABLE = (FAKE_MODEL, "fake-net-b", f"{FAKE_MODEL}@2")
FAKE_LABELS = tuple(f"class-{i}" for i in range(10))
FAKE_PREPROCESSING = Preprocessing(resize=40, crop=32, mean=(127.0, 127.0, 127.0), std=(128.0,) * 3)


@dataclass
class FakeEngine(Engine):
    """Probabilities are softmax(W @ per-channel means): a fixed function of the input, so
    `reference` is ground truth for any round trip. `delay_s` slows every batch, `gate`
    (when set up) holds batches until released, `fail` makes batches raise."""

    backends: tuple[str, ...] = ("sparse", "dense")
    delay_s: float = 0.0
    max_batch_size: int = 32
    fail: bool = False
    wrong_count: bool = False
    gate: threading.Event | None = None
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    rows_seen: list[float] = field(default_factory=list)
    closed: bool = False
    models: set[str] = field(default_factory=lambda: {FAKE_MODEL})
    load_delay_s: float = 0.0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(7)
        self.weights = rng.normal(size=(len(FAKE_LABELS), 3)).astype(np.float32) * 4
        self.started = threading.Event()

    def describe(self) -> dict[str, ModelDescription]:
        return {name: self._description(name) for name in sorted(self.models)}

    def _description(self, name: str) -> ModelDescription:
        return ModelDescription(
            name=name,
            version=name.partition("@")[2] or "1",
            architecture="fake",
            labels=FAKE_LABELS,
            preprocessing=FAKE_PREPROCESSING,
            backends=self.backends,
            max_batch_size=self.max_batch_size,
            device="cpu",
            precision="fp32",
            card={"layers": [{"name": "conv1", "sparsity": np.float32(0.5)}]},
            layer_sparsity={"conv1": 0.5, "conv2": 0.9},
        )

    def load_model(self, name: str) -> ModelDescription:
        if name not in FAKE_LOADABLE:
            raise UnknownModelError(name, FAKE_LOADABLE)
        time.sleep(self.load_delay_s)
        self.models.add(name)
        return self._description(name)

    def unload_model(self, name: str) -> None:
        self.models.discard(name)

    def reference(self, batch: np.ndarray) -> np.ndarray:
        features = np.asarray(batch, dtype=np.float32).mean(axis=(2, 3))
        logits = features @ self.weights.T
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def infer(self, model: str, backend: str, batch: np.ndarray) -> np.ndarray:
        assert model in self.models and backend in self.backends
        assert batch.ndim == 4 and batch.shape[1:] == (3, 32, 32), batch.shape
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls.append((model, backend, len(batch)))
        # The first value of each row identifies the request in tests that mark rows.
        self.rows_seen.extend(float(row[0, 0, 0]) for row in batch)
        if self.fail:
            raise RuntimeError("simulated device fault")
        out = self.reference(batch)
        if model.endswith("@2"):
            out = np.ascontiguousarray(out[:, ::-1])
        return out[:-1] if self.wrong_count else out

    def close(self) -> None:
        self.closed = True


def encode_image(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    return encode_image(Image.new("RGB", size, color))


def marked_tensor(mark: float, rows: int = 1) -> np.ndarray:
    """A preprocessed-input tensor whose rows start with `mark`, to spot them in the engine."""
    tensor = np.full((rows, 3, 32, 32), 0.1, dtype=np.float32)
    tensor[:, 0, 0, 0] = mark
    return tensor
