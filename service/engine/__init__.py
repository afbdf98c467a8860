"""The inference engine: pruned models in, probabilities out.

`load_engine` is the one entry point the service needs. torch is imported inside it, so
importing this package (for the protocol and errors) costs nothing and needs no GPU.
"""

from __future__ import annotations

from service.engine.protocol import Engine, EngineSpec, LayerObserver, StageObserver

__all__ = ["Engine", "EngineSpec", "LayerObserver", "load_engine"]


def load_engine(
    spec: EngineSpec,
    layer_observer: LayerObserver | None = None,
    progress: bool = True,
    stage_observer: StageObserver | None = None,
) -> Engine:
    """Load, build, tune and warm every model in `spec` on every backend in `spec.backends`.

    Returns when every (model, backend) is ready to serve. Raises UnknownModelError for a model
    name with no manifest (its message lists the ones there are), ValueError for a bad spec, and
    BackendUnavailableError when the device or the sparse kernel is missing."""
    from service.engine.engine import TorchEngine

    return TorchEngine(
        spec, layer_observer=layer_observer, progress=progress, stage_observer=stage_observer
    )
