"""EfficientNet-Lite0 in torchvision style, plus the mapping from EfficientNet-PyTorch keys.

Lite0 is EfficientNet-B0's 16 MBConv blocks in 7 stages with the changes that make it friendly to
fixed-point and mobile runtimes: no squeeze-and-excitation, ReLU6 instead of swish, and a stem
(32 channels) and head (1280 channels) that do not scale. BatchNorm uses TensorFlow's eps of 1e-3.

The model is plain nn.Conv2d / nn.BatchNorm2d / nn.ReLU6 modules with residual adds written as
`x + y`, so torch.fx traces it and the engine can fold BatchNorm and fuse epilogues.

Padding follows TensorFlow's "SAME": a stride-1 conv pads k // 2 on every side (the conv's own
symmetric padding), while a stride-2 conv on an even-sized map pads one pixel more at the bottom
and right than at the top and left. That asymmetric pad is an explicit nn.ZeroPad2d in front of
the conv, computed for even-sized maps; any input whose side is a multiple of 32 (224 included)
matches TensorFlow exactly.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay of 0.99, in torch's convention


@dataclass(frozen=True)
class StageSpec:
    expand_ratio: int
    kernel: int
    stride: int
    out_channels: int
    blocks: int


# EfficientNet-B0's stages; Lite0 keeps them as they are (width and depth multipliers are 1.0).
LITE0_STAGES = (
    StageSpec(1, 3, 1, 16, 1),
    StageSpec(6, 3, 2, 24, 2),
    StageSpec(6, 5, 2, 40, 2),
    StageSpec(6, 3, 2, 80, 3),
    StageSpec(6, 5, 1, 112, 3),
    StageSpec(6, 5, 2, 192, 4),
    StageSpec(6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_padding(kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF "SAME" padding (left, right, top, bottom) for an input whose side is a multiple of
    the stride (TF pads the extra pixel after, not before)."""
    # With `in` a multiple of the stride, out = in / stride and
    # total = (out - 1) * stride + kernel - in = kernel - stride.
    total = max(kernel - stride, 0)
    before = total // 2
    after = total - before
    return (before, after, before, after)


class ConvBNAct(nn.Sequential):
    """[ZeroPad2d] -> Conv2d (no bias) -> BatchNorm2d -> [ReLU6]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        pad = same_padding(kernel, stride)
        symmetric = pad[0] == pad[1] == pad[2] == pad[3]
        if not symmetric:
            layers["pad"] = nn.ZeroPad2d(pad)
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=pad[0] if symmetric else 0,
            groups=groups,
            bias=False,
        )
        layers["bn"] = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        if activation:
            layers["act"] = nn.ReLU6(inplace=False)
        super().__init__(layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (linear), no SE."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expand_ratio != 1:
            layers["expand"] = ConvBNAct(in_channels, hidden, 1)
        layers["depthwise"] = ConvBNAct(hidden, hidden, kernel, stride=stride, groups=hidden)
        layers["project"] = ConvBNAct(hidden, out_channels, 1, activation=False)
        self.block = nn.Sequential(layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.use_residual:
            return x + y
        return y


class EfficientNetLite(nn.Module):
    """features (stem, 7 stages, head) -> avgpool -> classifier, as torchvision's EfficientNet."""

    def __init__(
        self,
        stages: tuple[StageSpec, ...] = LITE0_STAGES,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, stride=2)]
        channels = STEM_CHANNELS
        for spec in stages:
            blocks = []
            for i in range(spec.blocks):
                stride = spec.stride if i == 0 else 1
                blocks.append(
                    MBConv(channels, spec.out_channels, spec.kernel, stride, spec.expand_ratio)
                )
                channels = spec.out_channels
            features.append(nn.Sequential(*blocks))
        features.append(ConvBNAct(channels, HEAD_CHANNELS, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(HEAD_CHANNELS, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    """EfficientNet-Lite0 with freshly initialized (untrained) weights."""
    return EfficientNetLite(LITE0_STAGES, num_classes=num_classes)


# EfficientNet-PyTorch's per-block names -> this module's names inside `block`.
_BLOCK_PARTS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_LEVEL = {
    "_conv_stem": "features.0.conv",
    "_bn0": "features.0.bn",
    "_conv_head": f"features.{len(LITE0_STAGES) + 1}.conv",
    "_bn1": f"features.{len(LITE0_STAGES) + 1}.bn",
    "_fc": "classifier.1",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _block_positions(stages: tuple[StageSpec, ...]) -> list[tuple[int, int]]:
    """Flat block index (EfficientNet-PyTorch) -> (features index, index within the stage)."""
    positions = []
    for stage_index, spec in enumerate(stages, start=1):
        positions.extend((stage_index, i) for i in range(spec.blocks))
    return positions


def convert_efficientnet_pytorch_state_dict(
    state_dict: dict[str, torch.Tensor], stages: tuple[StageSpec, ...] = LITE0_STAGES
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (`_blocks.3._depthwise_conv.weight`) to this module's
    (`features.2.1.block.depthwise.conv.weight`). Raises KeyError naming the first key that does
    not belong to an EfficientNet-Lite layout."""
    positions = _block_positions(stages)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, part, leaf = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(positions) or part not in _BLOCK_PARTS:
                raise KeyError(f"{key!r} is not an EfficientNet-Lite block parameter")
            stage, inner = positions[index]
            converted[f"features.{stage}.{inner}.block.{_BLOCK_PARTS[part]}.{leaf}"] = value
            continue
        head, _, leaf = key.partition(".")
        if head not in _TOP_LEVEL or not leaf:
            raise KeyError(f"{key!r} is not an EfficientNet-Lite parameter")
        converted[f"{_TOP_LEVEL[head]}.{leaf}"] = value
    return converted
