"""The kernel-variant registry: every sparse kernel the plan can run, registered once.

A variant is its CUDA source and its own files beside the reference (its config, metadata and
launch); `VARIANTS` lists them, in the order the policy (configs.py) breaks ties. The CUDA
module compiles every variant's instantiations (cuda.py), the plan builds metadata and
launches through `variant_for(config)` (plan.py), the tuner times `candidate_configs` across
all of them, and `KERNEL_VERSION`, which keys the tuning cache, changes whenever a variant's
source or parameter struct does. A new variant is its own files plus one line here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import Any, Protocol

import numpy as np
import torch

from service.kernels.direct import DIRECT
from service.kernels.direct_half import DIRECT_HALF
from service.kernels.launch import KernelLaunch
from service.kernels.stretched_csr import ConvGeometry, SparseWeight
from service.kernels.tiled import TILED
from service.kernels.tiled_half import TILED_HALF


class KernelVariant(Protocol):
    name: str  # as the benchmark and the tuning records name it
    dtype: torch.dtype  # of the input, output and residual it reads and writes
    config_type: type  # a frozen dataclass: one launch configuration of this kernel
    # CUDA C++ for NVRTC, in parts: the module holds each distinct part once, in registry
    # order, so variants share a source (or build on another's helpers) by naming its part.
    sources: tuple[str, ...]
    kernel_names: tuple[str, ...]  # the instantiations to compile
    params_dtype: np.dtype  # its parameter struct, field for field

    def supports(self, geometry: ConvGeometry) -> bool: ...

    def default_config(self, geometry: ConvGeometry, batch: int, density: float) -> tuple[Any, int]:
        """Its best guess for the shape, and a rank: the lowest rank's guess runs by default."""
        ...

    def candidates(self, geometry: ConvGeometry, batch: int, density: float) -> list[Any]:
        """The configs worth timing, its default first."""
        ...

    def meta_key(self, config: Any) -> Hashable:
        """Configs with equal keys share one metadata."""
        ...

    def build_meta(self, weight: SparseWeight, geometry: ConvGeometry, config: Any) -> Any:
        """The metadata on the CPU (it has `.to(device)`)."""
        ...

    def prepare_launch(
        self,
        geometry: ConvGeometry,
        meta: Any,
        config: Any,
        bias: torch.Tensor | None,
        batch: int,
        activation: str | None,
        device_index: int,
    ) -> KernelLaunch: ...


VARIANTS: tuple[KernelVariant, ...] = (TILED, DIRECT, TILED_HALF, DIRECT_HALF)

_BY_CONFIG = {variant.config_type: variant for variant in VARIANTS}


def sources() -> str:
    """The CUDA module's code: each distinct source once, in registry order."""
    return "".join(dict.fromkeys(part for variant in VARIANTS for part in variant.sources))


def dtypes() -> tuple[torch.dtype, ...]:
    """The storage types some variant runs, fp32 first."""
    return tuple(dict.fromkeys(variant.dtype for variant in VARIANTS))


def variant_for(config: Any) -> KernelVariant:
    """The variant a config belongs to."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise TypeError(f"no registered kernel variant runs {config!r}") from None


def _version() -> str:
    digest = hashlib.sha256()
    for variant in VARIANTS:
        digest.update(variant.name.encode())
        digest.update(str(variant.dtype).encode())
        for part in variant.sources:
            digest.update(part.encode())
        digest.update(repr(variant.params_dtype.descr).encode())
        digest.update(repr(variant.kernel_names).encode())
    return digest.hexdigest()[:12]


KERNEL_VERSION = _version()
