"""The direct kernel on fp16 storage: `escort_direct<P, unsigned short>` (direct_cuda.py).

Same decomposition, metadata and parameter struct as the fp32 direct kernel (direct.py); the
input, output and residual are IEEE half, every product is accumulated in fp32, and the
result is rounded to half once, in the epilogue (bias and records stay fp32). It lets an fp16
model run its sparse layers without a cast to fp32 and back around each of them (two extra
kernels and twice the bytes per layer). Its configs are their own type, so a tuned choice
records the precision too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.kernels.direct import DirectConfig, DirectVariant, direct_candidates, direct_default
from service.kernels.direct_cuda import DIRECT_HALF_KERNEL_NAMES, direct_kernel_name
from service.kernels.stretched_csr import ConvGeometry


@dataclass(frozen=True)
class DirectHalfConfig(DirectConfig):
    """A DirectConfig of the fp16 kernel (unequal to the fp32 one with the same fields)."""


def _half(config: DirectConfig) -> DirectHalfConfig:
    return DirectHalfConfig(config.pixels_per_lane, config.warps, config.splits)


class DirectHalfVariant(DirectVariant):
    """Ranked as the fp32 direct kernel is: behind the fp16 tiled kernel unless that one
    would have to split its chunks."""

    name = "direct-half"
    dtype = torch.float16
    config_type = DirectHalfConfig
    kernel_names = DIRECT_HALF_KERNEL_NAMES

    def default_config(
        self, geometry: ConvGeometry, batch: int, density: float
    ) -> tuple[DirectHalfConfig, int]:
        return _half(direct_default(geometry, batch, density)), 1

    def candidates(
        self, geometry: ConvGeometry, batch: int, density: float
    ) -> list[DirectHalfConfig]:
        return [_half(c) for c in direct_candidates(geometry, batch, density)]

    def kernel_name(self, config: DirectConfig) -> str:
        return direct_kernel_name(config.pixels_per_lane, half=True)


DIRECT_HALF = DirectHalfVariant()
