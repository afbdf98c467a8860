"""The small interface the HTTP layer depends on.

The service talks to an Engine only through this module: numpy arrays in, numpy arrays out,
plain dataclasses for descriptions. Nothing here imports torch, so the HTTP layer stays free of
it, tests can hand the service a fake engine, and the real engine could move to another process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BACKENDS = ("dense", "sparse", "auto")
PRECISIONS = ("fp32", "tf32", "fp16")

# Called once per timed layer of a sampled batch: (model, backend, layer, op, seconds, batch),
# batch the size the layers ran at (on a GPU the batch's bucket, the rows past it padding).
LayerObserver = Callable[[str, str, str, str, float, int], None]
# Called once per stage of each batch on a GPU: (model, backend, stage, seconds), stage one of
# h2d (rows to the device, photos decoded), replay, d2h.
StageObserver = Callable[[str, str, str, float], None]


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image (0-255) becomes the model's input: resize the short side, center-crop,
    then (x - mean) / std per channel, with mean and std in 0-255 units."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ModelDescription:
    name: str  # what the engine, the batchers and the metrics call it: the manifest's file name
    architecture: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    backends: tuple[str, ...]  # loaded backends, the default first
    max_batch_size: int
    device: str
    precision: str
    # Per-layer facts for /v1/models: name, shape, sparsity, backend chosen, timings.
    card: dict[str, Any] = field(default_factory=dict)
    # layer name -> fraction of zero weights, exported as escort_layer_sparsity.
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    # True when the engine takes encoded JPEG photos as rows (1-D uint8) and decodes and
    # prepares them itself, batched on its device (ESCORT_IMAGE_DECODE=engine).
    decodes_images: bool = False
    version: str = "1"  # of `model_name`; several versions may be served side by side

    @property
    def model_name(self) -> str:
        """The name clients use: "resnet50-uniform90" for "resnet50-uniform90@2" too."""
        return self.name.partition("@")[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.preprocessing.crop, self.preprocessing.crop)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class Engine(ABC):
    """Runs batches of preprocessed images. `infer` blocks; callers run it off the event loop,
    one batch at a time per (model, backend)."""

    @abstractmethod
    def describe(self) -> dict[str, ModelDescription]:
        """Every loaded model, by name."""

    @abstractmethod
    def infer(self, model: str, backend: str, batch: np.ndarray) -> np.ndarray:
        """batch: float32 or float16 [N, 3, H, W] with N <= max_batch_size.
        Returns float32 probabilities [N, num_classes]."""

    def infer_rows(self, model: str, backend: str, rows: Sequence[np.ndarray]) -> np.ndarray:
        """`infer` on rows [3, H, W] that are not one array (views into shared memory, say).
        Engines that copy rows to a device themselves override this to skip the stacking.
        Where the model's description says `decodes_images`, a row may also be an encoded
        JPEG (1-D uint8); one that does not decode answers a row of NaN."""
        return self.infer(model, backend, np.stack(rows))

    # True when launch_rows returns before the batch is done (so batching may overlap two).
    pipelined: bool = False

    def launch_rows(self, model: str, backend: str, rows: Sequence[np.ndarray]) -> Any:
        """Start a batch and return a handle for `collect`, so that the next batch can be
        staged while this one runs. The default computes it here and now."""
        return self.infer_rows(model, backend, rows)

    def collect(self, model: str, backend: str, launched: Any) -> np.ndarray:
        """The probabilities of a batch `launch_rows` started (in launch order)."""
        return launched

    def pin_host_memory(self, address: int, size: int) -> bool:
        """Page-lock host memory that rows will live in (a shared-memory arena), so that
        copies from it to the device need no staging. False where it means nothing."""
        return False

    def unpin_host_memory(self, address: int) -> None:  # noqa: B027 - optional hook
        """Undo `pin_host_memory` before the memory goes away."""

    def prefetch_rows(self, rows: Sequence[np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Rows just written into pinned memory, ahead of their batch: a GPU engine starts
        their copies to the device now, while earlier batches run."""

    def memory_stats(self) -> Mapping[str, Mapping[str, float]]:
        """{device: {"allocated": bytes, "reserved": bytes, "total": bytes}}; empty on CPU."""
        return {}

    def warmup(self, model: str, backend: str) -> None:  # noqa: B027 - optional hook
        """Build whatever a first batch would otherwise pay for, once per model and backend
        before readiness, in the thread that will run that model's batches (some libraries
        keep their tuned state per thread)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release devices and threads."""

    def load_model(self, name: str) -> ModelDescription:
        """Load, build and warm one more model (a manifest name) while the others keep serving;
        its description. Engines that cannot say so (the repository API then answers 400)."""
        raise NotImplementedError(f"this engine cannot load models at run time ({name!r})")

    def unload_model(self, name: str) -> None:
        """Release a model; its batches have finished (the caller drained them)."""
        raise NotImplementedError(f"this engine cannot unload models at run time ({name!r})")


@dataclass(frozen=True)
class EngineSpec:
    """What to load; built by the service from its Settings, readable without torch."""

    models: tuple[str, ...]
    backends: tuple[str, ...]  # backends kept loaded, the default first
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 (TF32 off) | tf32 | fp16
    max_batch_size: int = 32
    batch_bucket_step: int = 4  # see runner.batch_buckets; 0: powers of two only
    layer_profile_every: int = 100  # 0 turns sampled per-layer profiling off
    models_dir: str = ""  # comma list searched before the shipped manifests
    cache_dir: str = ".escort-cache"  # the auto-tuning decisions (autotune.json)
    cuda_graphs: bool = True
    device_mirror: bool = True  # device copies of pinned arenas, filled by prefetch_rows
