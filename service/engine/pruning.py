"""Magnitude pruning by profile: which layers get which sparsity, and zeroing the smallest weights.

A profile (service.engine.manifest.PruningProfile) resolves against a concrete model into a table
`module name -> target sparsity`. Pruning then zeros, per layer, exactly round(numel * sparsity)
of the weights with the smallest magnitude (ties broken by position, so it is deterministic).
Weights that are already zero count as pruned first, so pruning a pruned checkpoint again at a
lower sparsity leaves it as it was.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from service.engine.manifest import INCLUDE_CHOICES, PruningProfile


@dataclass(frozen=True)
class PublishedProfile:
    architecture: str
    citation: str
    # (torchvision module name, the paper's layer name, percent of weights removed)
    layers: tuple[tuple[str, str, float], ...]

    def sparsities(self) -> dict[str, float]:
        return {module: percent / 100.0 for module, _, percent in self.layers}


def _resnet50_skimcaffe() -> tuple[tuple[str, str, float], ...]:
    # Only the 3x3 conv of each bottleneck is pruned; conv1 and every 1x1 stay dense.
    per_stage = {
        "layer1": (88.0, 84.0, 80.8),
        "layer2": (91.8, 91.9, 95.5, 91.1),
        "layer3": (96.6, 97.5, 97.1, 96.8, 96.8, 96.8),
        "layer4": (97.8, 98.0, 97.9),
    }
    rows = []
    for stage_index, (stage, percents) in enumerate(per_stage.items(), start=2):
        for block, percent in enumerate(percents):
            paper = f"res{stage_index}{'abcdef'[block]}_branch2b"
            rows.append((f"{stage}.{block}.conv2", paper, percent))
    return tuple(rows)


PUBLISHED_PROFILES: dict[str, PublishedProfile] = {
    "alexnet-deepcompression": PublishedProfile(
        "alexnet",
        "Han et al. 2015, Deep Compression, Table 4",
        (
            ("features.0", "conv1", 16.0),
            ("features.3", "conv2", 62.0),
            ("features.6", "conv3", 65.0),
            ("features.8", "conv4", 63.0),
            ("features.10", "conv5", 63.0),
            ("classifier.1", "fc6", 91.0),
            ("classifier.4", "fc7", 91.0),
            ("classifier.6", "fc8", 75.0),
        ),
    ),
    "vgg16-deepcompression": PublishedProfile(
        "vgg16",
        "Han et al. 2015, Deep Compression, Table 5",
        (
            ("features.0", "conv1_1", 42.0),
            ("features.2", "conv1_2", 78.0),
            ("features.5", "conv2_1", 66.0),
            ("features.7", "conv2_2", 64.0),
            ("features.10", "conv3_1", 47.0),
            ("features.12", "conv3_2", 76.0),
            ("features.14", "conv3_3", 58.0),
            ("features.17", "conv4_1", 68.0),
            ("features.19", "conv4_2", 73.0),
            ("features.21", "conv4_3", 66.0),
            ("features.24", "conv5_1", 65.0),
            ("features.26", "conv5_2", 71.0),
            ("features.28", "conv5_3", 64.0),
            ("classifier.0", "fc6", 96.0),
            ("classifier.3", "fc7", 96.0),
            ("classifier.6", "fc8", 77.0),
        ),
    ),
    "resnet50-skimcaffe": PublishedProfile(
        "resnet50",
        "Park et al. 2017, SkimCaffe ResNet-50 (the weights Escort used)",
        _resnet50_skimcaffe(),
    ),
}


class ProfileError(ValueError):
    """A profile that does not fit the model it is applied to."""


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by name, in definition order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


def _included(module: nn.Module, include: str) -> bool:
    if include == "all":
        return True
    if not isinstance(module, nn.Conv2d):
        return False
    kernel = tuple(module.kernel_size)
    if include == "conv3x3":
        return kernel == (3, 3)
    if include == "conv1x1":
        return kernel == (1, 1)
    return True


def resolve_sparsities(
    model: nn.Module, profile: PruningProfile, architecture: str | None = None
) -> dict[str, float]:
    """The target sparsity of every layer the profile touches (layers it leaves alone are absent).
    Raises ProfileError when a named layer or glob matches nothing, or a published profile is
    applied to another architecture."""
    layers = prunable_layers(model)
    if profile.kind == "none":
        return {}
    if profile.kind == "uniform":
        if profile.include not in INCLUDE_CHOICES:
            raise ProfileError(
                f"include={profile.include!r}: expected one of {', '.join(INCLUDE_CHOICES)}"
            )
        return {
            name: profile.sparsity
            for name, module in layers.items()
            if _included(module, profile.include)
        }
    if profile.kind == "per_layer":
        return _match_per_layer(layers, profile.layers)
    if profile.kind == "published":
        published = PUBLISHED_PROFILES.get(profile.name or "")
        if published is None:
            raise ProfileError(
                f"unknown published profile {profile.name!r}: expected one of "
                f"{', '.join(sorted(PUBLISHED_PROFILES))}"
            )
        if architecture is not None and architecture != published.architecture:
            raise ProfileError(
                f"published profile {profile.name!r} is for {published.architecture}, "
                f"not {architecture}"
            )
        targets = published.sparsities()
        missing = [name for name in targets if name not in layers]
        if missing:
            raise ProfileError(
                f"published profile {profile.name!r} names layers this model lacks: "
                f"{', '.join(missing)} (expected {published.architecture})"
            )
        return targets
    raise ProfileError(f"unknown profile kind {profile.kind!r}")


def _match_per_layer(layers: dict[str, nn.Module], table: dict[str, float]) -> dict[str, float]:
    """Exact names win over globs; among globs, the first listed that matches wins."""
    targets: dict[str, float] = {}
    for pattern, sparsity in table.items():
        if pattern in layers:
            targets[pattern] = sparsity
    for pattern, sparsity in table.items():
        if pattern in layers:
            continue
        matched = [name for name in layers if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ProfileError(
                f"per-layer entry {pattern!r} matches no Conv2d or Linear layer; names look like "
                f"{', '.join(list(layers)[:4])}"
            )
        for name in matched:
            targets.setdefault(name, sparsity)
    return {name: targets[name] for name in layers if name in targets}


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """values.kthvalue(k), several times faster on the 100M-weight fc layers: a strided sample
    brackets the answer, and only the values inside the bracket are searched exactly."""
    n = values.numel()
    if n <= 1 << 22:
        return values.kthvalue(k).values
    sample = values[:: n // (1 << 16)]
    q = k / n
    lo = torch.quantile(sample, max(q - 0.01, 0.0))
    hi = torch.quantile(sample, min(q + 0.01, 1.0))
    below = int((values < lo).sum())
    band = values[(values >= lo) & (values <= hi)]
    if below < k <= below + band.numel():
        return band.kthvalue(k - below).values
    return values.kthvalue(k).values


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A bool mask that keeps all but the round(numel * sparsity) smallest-magnitude weights."""
    flat = weight.detach().abs().flatten()
    k = round(flat.numel() * sparsity)
    if k <= 0:
        return torch.ones_like(weight, dtype=torch.bool)
    if k >= flat.numel():
        return torch.zeros_like(weight, dtype=torch.bool)
    threshold = _kth_smallest(flat, k)
    keep = flat > threshold
    # Equal magnitudes at the threshold: prune the first ones until exactly k are gone.
    ties = torch.nonzero(flat == threshold).squeeze(1)
    below = flat.numel() - int(keep.sum()) - ties.numel()
    keep[ties[k - below :]] = True
    return keep.view_as(weight)


def magnitude_prune(
    model: nn.Module, targets: dict[str, float], progress: bool = False
) -> dict[str, float]:
    """Zero the smallest weights of each named layer in place; returns the measured sparsity of
    every pruned layer."""
    layers = prunable_layers(model)
    unknown = [name for name in targets if name not in layers]
    if unknown:
        raise ProfileError(f"no Conv2d or Linear layer named {', '.join(unknown)}")
    items: Iterable[tuple[str, float]] = targets.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(list(items), desc="pruning", unit="layer")
    measured: dict[str, float] = {}
    with torch.no_grad():
        for name, sparsity in items:
            weight = layers[name].weight
            weight.mul_(magnitude_mask(weight, sparsity).to(weight.dtype))
            measured[name] = weight_sparsity(weight)
    return measured


def weight_sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of every Conv2d and Linear layer."""
    return {name: weight_sparsity(m.weight) for name, m in prunable_layers(model).items()}


def sparsity_report(model: nn.Module, targets: dict[str, float]) -> list[dict[str, object]]:
    """One row per Conv2d/Linear layer: name, kind, weight shape, target (None when untouched),
    measured sparsity and nonzero count."""
    rows = []
    for name, module in prunable_layers(model).items():
        weight = module.weight
        nnz = int(torch.count_nonzero(weight))
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            kind = f"conv{kh}x{kw}" + ("dw" if module.groups == module.in_channels > 1 else "")
        else:
            kind = "linear"
        rows.append(
            {
                "name": name,
                "kind": kind,
                "shape": list(weight.shape),
                "target": targets.get(name),
                "sparsity": 1.0 - nnz / weight.numel(),
                "nnz": nnz,
                "numel": weight.numel(),
            }
        )
    return rows
