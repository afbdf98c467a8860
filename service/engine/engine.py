"""TorchEngine: the Engine the service runs, one Runner per (model, backend).

Loading a model: manifest -> pruned nn.Module (the models' loader) -> prepare once (fold BN,
fuse, shapes) -> build each requested backend -> warm (and on CUDA capture) every bucket ->
model card. Everything that can fail does so here, at load, not on the first request.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.engine.assemble import BuiltModel, build_backend
from service.engine.autotune import Timer, TuningCache
from service.engine.backends import PlanFactory
from service.engine.build import prepare_model
from service.engine.card import layer_sparsity, model_card
from service.engine.errors import (
    BackendUnavailableError,
    UnknownBackendError,
    UnknownModelError,
)
from service.engine.hostcopy import DeviceMirror, PinnedRanges
from service.engine.protocol import (
    BACKENDS,
    PRECISIONS,
    Engine,
    EngineSpec,
    LayerObserver,
    ModelDescription,
    Preprocessing,
    StageObserver,
)
from service.engine.runner import Launched, Runner, batch_buckets
from service.engine.tracing import GUARD

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


@dataclass
class ModelSource:
    """A model to serve: the pruned module and what the service needs to describe it."""

    name: str
    architecture: str
    module: nn.Module
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    source: str = ""
    version: int = 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {device!r} asked for, but torch sees no CUDA GPU; use ESCORT_DEVICE=cpu"
            )
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
        resolved = torch.device("cuda", index)
    return resolved


def available_models(models_dir: str | Path) -> list[str]:
    """Manifest names in the model folders (ESCORT_MODELS_DIR, then the shipped ones)."""
    from service.engine.manifest import list_manifests

    return list_manifests(models_dir)


def check_known(name: str, models_dir: str | Path) -> None:
    """UnknownModelError (listing the manifests there are) unless `name` names a manifest in
    the models folders, or is the path of a manifest file (a user's model outside them)."""
    from service.engine.manifest import model_dirs

    known = available_models(models_dir)
    if name not in known and not (Path(name).suffix in MANIFEST_SUFFIXES and Path(name).is_file()):
        where = ", ".join(str(folder) for folder in model_dirs(models_dir))
        raise UnknownModelError(name, known, where)


def load_source(name: str, models_dir: str | Path, progress: bool = False) -> ModelSource:
    """Manifest and pruned weights of a shipped (or user) model, by manifest name."""
    from service.engine.loader import load_pruned_model
    from service.engine.manifest import load_manifest

    check_known(name, models_dir)
    manifest = load_manifest(name, models_dir)
    module = load_pruned_model(manifest, progress=progress)
    return ModelSource(
        version=manifest.version,
        name=manifest.name,
        architecture=manifest.architecture,
        module=module,
        preprocessing=manifest.preprocessing,
        labels=tuple(manifest.labels),
        source=str(getattr(manifest, "source", "") or getattr(manifest, "description", "")),
    )


def check_spec(spec: EngineSpec) -> None:
    if not spec.models:
        raise ValueError("no models to load; set ESCORT_MODELS")
    if not spec.backends:
        raise ValueError("no backends to load; set ESCORT_BACKEND or ESCORT_BACKENDS")
    for backend in spec.backends:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if spec.precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {spec.precision!r}; choose from {', '.join(PRECISIONS)}"
        )
    if spec.max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {spec.max_batch_size}")


class _Progress:
    """Progress of a load when asked for: a tqdm bar on a terminal; on anything else (a file,
    a container log) one INFO line per step instead, since a bar there is a stream of "\\r"
    and escape codes. A no-op when not asked for (and the bar is one when tqdm is missing)."""

    # Between steps (the auto-tuning of a big model on one backend can take minutes), a
    # log shows the latest note at most this often, so that a long load still shows life.
    NOTE_EVERY_S = 10.0

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.total = total
        self.done = 0
        self.logging = enabled and not sys.stderr.isatty()
        self.last_line = time.monotonic()
        if enabled and not self.logging:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="loading models", unit="step", leave=False)

    def step(self, text: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif self.logging:
            log.info("loading models %d/%d: %s", self.done, self.total, text)
            self.last_line = time.monotonic()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)  # shown at the bar's own pace
        elif self.logging and time.monotonic() - self.last_line >= self.NOTE_EVERY_S:
            log.info("loading models %d/%d: %s", self.done, self.total, text)
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TorchEngine(Engine):
    def __init__(
        self,
        spec: EngineSpec,
        sources: Sequence[ModelSource] | None = None,
        layer_observer: LayerObserver | None = None,
        progress: bool = True,
        *,
        plan_factory: PlanFactory | None = None,
        timer: Timer | None = None,
        load: Callable[[str, str, bool], ModelSource] = load_source,
        stage_observer: StageObserver | None = None,
    ) -> None:
        self._stage_observer = stage_observer
        check_spec(spec)
        self.spec = spec
        self.device = resolve_device(spec.device)
        # What actually runs: without CUDA every precision is fp32 (the card notes why).
        self.precision = spec.precision if self.device.type == "cuda" else "fp32"
        self.buckets = batch_buckets(spec.max_batch_size, spec.batch_bucket_step)
        if self.device.type == "cuda":
            # Shapes are fixed per bucket, so cuDNN's one-time algorithm search pays off.
            torch.backends.cudnn.benchmark = True
        self._runners: dict[str, dict[str, Runner]] = {}
        self._pinned = PinnedRanges()  # the arenas pin_host_memory registered
        # Device copies of those arenas, filled as requests arrive (prefetch_rows).
        self._mirror = (
            DeviceMirror(self.device)
            if spec.device_mirror and self.device.type == "cuda" and DeviceMirror.available()
            else None
        )
        self._descriptions: dict[str, ModelDescription] = {}
        cache = TuningCache(Path(spec.cache_dir) / "autotune.json")
        # Kept for load_model: a model loaded at run time is built as the first ones were.
        self._build_with = (cache, layer_observer, plan_factory, timer)
        self._load_source = load
        names = [s.name for s in sources] if sources is not None else list(spec.models)
        given = {s.name: s for s in sources or ()}
        bar = _Progress(len(names) * (2 + 2 * len(spec.backends)), progress)
        try:
            for name in names:
                if name in given:
                    source = given[name]
                else:
                    bar.note(f"{name}: loading weights")
                    source = load(name, spec.models_dir, progress)
                bar.step(f"{name}: loaded")
                self._load(source, cache, layer_observer, plan_factory, timer, bar)
        except BaseException:
            bar.close()
            self.close()
            raise
        bar.close()

    def _load(self, source, cache, observer, plan_factory, timer, bar: _Progress) -> None:
        spec = self.spec
        input_shape = (3, source.preprocessing.crop, source.preprocessing.crop)
        prepared = prepare_model(source.module, input_shape)
        bar.step(f"{source.name}: folded and fused {len(prepared.layers)} convs")
        # On CPU auto measures once at batch 1: a quick decision, not a sweep.
        tune_buckets = self.buckets if self.device.type == "cuda" else (1,)
        builts: dict[str, BuiltModel] = {}
        runners: dict[str, Runner] = {}
        sparse_ops: dict = {}  # shared by this model's sparse and auto builds
        self._runners[source.name] = runners
        for backend in spec.backends:
            total = len(prepared.layers)
            done = [0]

            def tick(layer: str, backend: str = backend, total: int = total, done=done) -> None:
                done[0] += 1
                bar.note(f"{source.name}/{backend}: tuning {done[0]}/{total} {layer}")

            builts[backend] = build_backend(
                prepared,
                backend,
                self.device,
                spec.precision,
                buckets=tune_buckets,
                cache=cache,
                timer=timer,
                plan_factory=plan_factory,
                cuda_graphs=spec.cuda_graphs,
                on_layer=tick,
                sparse_ops=sparse_ops,
            )
            bar.step(f"{source.name}/{backend}: built")
            runner = Runner(
                builts[backend],
                model_name=source.name,
                input_shape=input_shape,
                max_batch_size=spec.max_batch_size,
                buckets=self.buckets,
                cuda_graphs=spec.cuda_graphs,
                profile_every=spec.layer_profile_every,
                observer=observer,
                preprocessing=source.preprocessing,
                stage_observer=self._stage_observer,
            )
            runner.pinned = self._pinned
            runner.mirror = self._mirror
            runners[backend] = runner
            runner.warm()
            if runner.num_classes != len(source.labels):
                raise ValueError(
                    f"model {source.name!r} outputs {runner.num_classes} classes but its "
                    f"manifest lists {len(source.labels)} labels"
                )
            bar.step(f"{source.name}/{backend}: warm")
        card = model_card(
            source.name,
            source.architecture,
            prepared,
            builts,
            device=str(self.device),
            precision=self.precision,
            source=source.source,
        )
        if self.device.type == "cpu":
            from service.engine.cpu_cost import cpu_reference_cost

            cost = cpu_reference_cost(source.name, prepared, builts)
            if cost is not None:
                card["cpu_reference"] = cost
        self._descriptions[source.name] = ModelDescription(
            name=source.name,
            version=str(source.version),
            architecture=source.architecture,
            labels=source.labels,
            preprocessing=source.preprocessing,
            backends=tuple(spec.backends),
            max_batch_size=spec.max_batch_size,
            device=str(self.device),
            precision=self.precision,
            card=card,
            layer_sparsity=layer_sparsity(prepared),
            decodes_images=True,
        )

    # ------------------------------------------------------------ Engine

    def describe(self) -> dict[str, ModelDescription]:
        return dict(self._descriptions)

    def runner(self, model: str, backend: str) -> Runner:
        runners = self._runners.get(model)
        if runners is None or model not in self._descriptions:
            raise UnknownModelError(model, self._descriptions)
        if backend not in runners:
            raise UnknownBackendError(model, backend, runners)
        return runners[backend]

    # Each call that may run modules does so under GUARD.running(): a model being loaded
    # beside them traces under GUARD.tracing() (see service/engine/tracing.py).

    def warmup(self, model: str, backend: str) -> None:
        with GUARD.running():
            self.runner(model, backend).warm_this_thread()

    def infer(self, model: str, backend: str, batch: np.ndarray) -> np.ndarray:
        with GUARD.running():
            return self.runner(model, backend).infer(batch)

    def infer_rows(self, model: str, backend: str, rows: Sequence[np.ndarray]) -> np.ndarray:
        with GUARD.running():
            return self.runner(model, backend).infer_rows(rows)

    @property
    def pipelined(self) -> bool:  # type: ignore[override]
        return self.device.type == "cuda"

    def launch_rows(self, model: str, backend: str, rows: Sequence[np.ndarray]) -> Launched:
        with GUARD.running():
            return self.runner(model, backend).launch_rows(rows)

    def collect(self, model: str, backend: str, launched: Launched) -> np.ndarray:
        return self.runner(model, backend).collect(launched)

    def pin_host_memory(self, address: int, size: int) -> bool:
        if self.device.type != "cuda":
            return False
        # cudaHostRegister: the rows' own pages become DMA-able, so each row goes to the
        # device in one async copy with no pinned staging copy in between.
        with torch.cuda.device(self.device):
            err = torch.cuda.cudart().cudaHostRegister(address, size, 0)
        if int(err) != 0:
            log.warning("cudaHostRegister of %d bytes failed (%s): rows are staged", size, err)
            return False
        self._pinned.add(address, size)
        if self._mirror is not None:
            try:
                self._mirror.add(address, size)
            except RuntimeError as exc:  # out of device memory: its rows cross at launch
                log.warning("no device copy of a %d MiB arena (%s)", size >> 20, exc)
        return True

    def prefetch_rows(self, rows: Sequence[np.ndarray]) -> None:
        if self._mirror is not None:
            self._mirror.push(rows)

    def unpin_host_memory(self, address: int) -> None:
        if self.device.type == "cuda":
            if self._mirror is not None:
                self._mirror.remove(address)
            self._pinned.remove(address)
            with torch.cuda.device(self.device):
                torch.cuda.cudart().cudaHostUnregister(address)

    def memory_stats(self) -> dict[str, dict[str, float]]:
        if self.device.type != "cuda":
            return {}
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            str(self.device): {
                "allocated": float(torch.cuda.memory_allocated(self.device)),
                "reserved": float(torch.cuda.memory_reserved(self.device)),
                "total": float(total),
                "free": float(free),
            }
        }

    def load_model(self, name: str) -> ModelDescription:
        """Load, build, warm and capture one more model while the others keep serving."""
        if name in self._runners:
            return self._descriptions[name]
        source = self._load_source(name, self.spec.models_dir, False)
        bar = _Progress(2 + 2 * len(self.spec.backends), True)  # a log line per step
        try:
            self._load(source, *self._build_with, bar)
        except BaseException:
            self.unload_model(source.name)
            raise
        finally:
            bar.close()
        return self._descriptions[source.name]

    def unload_model(self, name: str) -> None:
        for runner in self._runners.pop(name, {}).values():
            runner.close()
        self._descriptions.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        for runners in self._runners.values():
            for runner in runners.values():
                runner.close()
        self._runners.clear()
        self._descriptions.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
