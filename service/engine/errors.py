"""Errors the engine raises for its callers to map; no torch here, so the HTTP layer may import it.

Each one subclasses the builtin a caller would naturally catch (LookupError, ValueError), so code
that does not know these names still handles them sensibly.
"""

from __future__ import annotations

from collections.abc import Iterable


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class UnknownModelError(EngineError, LookupError):
    """A model name that no manifest (or no loaded model) answers to."""

    def __init__(self, name: str, available: Iterable[str], where: str = "") -> None:
        self.name = name
        self.available = tuple(sorted(available))
        listed = ", ".join(self.available) or "none"
        place = f" in {where}" if where else ""
        super().__init__(f"unknown model {name!r}{place}; available: {listed}")

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0])


class UnknownBackendError(EngineError, LookupError):
    """A backend that is not loaded for the model."""

    def __init__(self, model: str, backend: str, loaded: Iterable[str]) -> None:
        self.backend = backend
        self.loaded = tuple(loaded)
        super().__init__(
            f"backend {backend!r} is not loaded for model {model!r}; "
            f"loaded: {', '.join(self.loaded)} (set ESCORT_BACKENDS to keep more loaded)"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class BadBatchError(EngineError, ValueError):
    """A batch whose shape, size or dtype the model cannot take."""


class BackendUnavailableError(EngineError, RuntimeError):
    """A backend or device that this machine cannot provide (no CUDA, no CuPy)."""
