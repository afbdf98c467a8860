"""Network architectures by name: torchvision's classification builders plus the project's own.

`build_architecture("resnet50")` gives torchvision's resnet50 with untrained weights;
`build_architecture("efficientnet_lite0")` gives the project's EfficientNet-Lite0. Nothing is
imported from torchvision until a name is asked for.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import cache

from torch import nn

from service.engine.architectures.efficientnet_lite import efficientnet_lite0

_PROJECT_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "efficientnet_lite0": efficientnet_lite0,
}


@cache
def _torchvision_classifiers() -> tuple[str, ...]:
    import torchvision.models

    # Only the ImageNet classifiers: detection and segmentation builders take other arguments.
    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_architectures() -> list[str]:
    """Every architecture name a manifest or `escort prune` may use."""
    return sorted({*_PROJECT_ARCHITECTURES, *_torchvision_classifiers()})


def unknown_architecture_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_architectures(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown architecture {name!r}: expected efficientnet_lite0 or a torchvision "
        f"classification builder such as resnet50, vgg16, alexnet{hint}"
    )


def is_known_architecture(name: str) -> bool:
    return name in _PROJECT_ARCHITECTURES or name in _torchvision_classifiers()


def build_architecture(name: str, num_classes: int = 1000) -> nn.Module:
    """A freshly initialized model of the named architecture, on the current default device.
    Raises ValueError for an unknown name."""
    if name in _PROJECT_ARCHITECTURES:
        return _PROJECT_ARCHITECTURES[name](num_classes=num_classes)
    if name not in _torchvision_classifiers():
        raise ValueError(unknown_architecture_message(name))
    import torchvision.models

    kwargs = {"num_classes": num_classes}
    if name.startswith("inception") or name.startswith("googlenet"):
        # Their auxiliary heads are for training only and make the graph data-dependent.
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    return torchvision.models.get_model(name, weights=None, **kwargs)


__all__ = [
    "build_architecture",
    "efficientnet_lite0",
    "is_known_architecture",
    "list_architectures",
    "unknown_architecture_message",
]
