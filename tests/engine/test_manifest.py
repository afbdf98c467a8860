"""Manifest parsing: the shipped manifests, and every way a manifest can be wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.engine.manifest import (
    PUBLISHED_PROFILE_NAMES,
    ManifestError,
    PruningProfile,
    WeightsSource,
    list_manifests,
    load_manifest,
    manifest_path,
    model_dirs,
    shipped_models_dir,
)

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
SHIPPED = (
    "alexnet-deepcompression",
    "efficientnet-lite0",
    "resnet50-skimcaffe",
    "resnet50-uniform90",
    "vgg16-deepcompression",
)
IMAGENET_MEAN = (123.675, 116.28, 103.53)

GOOD = """\
architecture = "resnet18"
description = "a test model"
labels = "labels.txt"
[weights]
kind = "synthetic"
seed = 7
[pruning]
kind = "uniform"
sparsity = 0.5
include = "conv3x3"
[preprocessing]
resize = 160
crop = 128
mean = [1, 2, 3]
std = [4.0, 5.0, 6.0]
"""


def write(folder: Path, text: str, name: str = "tiny", labels: int = 10) -> Path:
    (folder / "labels.txt").write_text("".join(f"class {i}\n" for i in range(labels)))
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def test_the_shipped_manifests_are_listed() -> None:
    assert tuple(list_manifests(MODELS)) == SHIPPED


def test_a_missing_folder_adds_nothing_to_the_shipped_manifests(tmp_path: Path) -> None:
    assert list_manifests(tmp_path / "nowhere") == list_manifests() == sorted(SHIPPED)


def test_a_user_folder_comes_before_the_shipped_one(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    write(mine, GOOD, name="efficientnet-lite0")  # replaces the shipped manifest of that name
    write(theirs, GOOD, name="tiny")
    folders = f"{mine},{theirs}"
    assert model_dirs(folders)[:2] == [mine, theirs] and len(model_dirs(folders)) == 3
    assert manifest_path("efficientnet-lite0", folders) == mine / "efficientnet-lite0.toml"
    assert manifest_path("tiny", folders) == theirs / "tiny.toml"
    assert manifest_path("resnet50-uniform90", folders).parent == shipped_models_dir()
    assert {"tiny", "efficientnet-lite0", "resnet50-uniform90"} <= set(list_manifests(folders))
    assert load_manifest("efficientnet-lite0", folders).architecture == "resnet18"


def test_the_shipped_manifests_are_found_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_manifest("resnet50-uniform90").name == "resnet50-uniform90"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_manifest_loads(name: str) -> None:
    manifest = load_manifest(name, MODELS)
    assert manifest.name == name
    assert manifest.source == MODELS / f"{name}.toml"
    assert manifest.num_classes == len(manifest.labels) == 1000
    assert manifest.labels[281] == "tabby" and manifest.labels[967] == "espresso"
    assert manifest.preprocessing.resize == 256 and manifest.preprocessing.crop == 224
    assert len(manifest.description) > 100


def test_shipped_manifests_say_what_the_product_promises() -> None:
    lite = load_manifest("efficientnet-lite0", MODELS)
    assert lite.architecture == "efficientnet_lite0"
    assert lite.weights == WeightsSource(kind="package")
    assert lite.preprocessing.mean == (127.0,) * 3 and lite.preprocessing.std == (128.0,) * 3
    assert lite.pruning.kind == "per_layer"
    assert max(lite.pruning.layers.values()) <= 0.5

    uniform = load_manifest("resnet50-uniform90", MODELS)
    assert (uniform.architecture, uniform.weights.kind) == ("resnet50", "synthetic")
    assert uniform.pruning == PruningProfile(kind="uniform", sparsity=0.9, include="conv")
    assert uniform.preprocessing.mean == IMAGENET_MEAN

    for name, arch in [
        ("resnet50-skimcaffe", "resnet50"),
        ("vgg16-deepcompression", "vgg16"),
        ("alexnet-deepcompression", "alexnet"),
    ]:
        manifest = load_manifest(name, MODELS)
        assert manifest.architecture == arch
        assert manifest.pruning == PruningProfile(kind="published", name=name)
        assert manifest.weights == WeightsSource(kind="synthetic", seed=0)


def test_a_manifest_loads_by_path_with_its_own_labels(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    manifest = load_manifest(str(path))
    assert manifest.name == "tiny"
    assert manifest.labels == tuple(f"class {i}" for i in range(10))
    assert manifest.num_classes == 10
    assert manifest.weights == WeightsSource(kind="synthetic", seed=7)
    assert manifest.pruning == PruningProfile(kind="uniform", sparsity=0.5, include="conv3x3")
    assert manifest.preprocessing.mean == (1.0, 2.0, 3.0)
    assert load_manifest("tiny", tmp_path) == manifest


def test_a_file_source_resolves_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.pth").write_bytes(b"x")
    text = GOOD.replace('kind = "synthetic"\nseed = 7', 'kind = "file"\npath = "ckpt/w.pth"')
    manifest = load_manifest(write(tmp_path, text))
    assert manifest.weights == WeightsSource(kind="file", path="ckpt/w.pth")
    assert manifest.weights_path() == tmp_path / "ckpt" / "w.pth"


def test_per_layer_tables_keep_their_order(tmp_path: Path) -> None:
    text = GOOD.replace(
        'kind = "uniform"\nsparsity = 0.5\ninclude = "conv3x3"',
        'kind = "per_layer"\n[pruning.layers]\n"layer1.*" = 0.5\n"conv1" = 0.25\nfc = 0',
    )
    manifest = load_manifest(write(tmp_path, text))
    assert list(manifest.pruning.layers.items()) == [
        ("layer1.*", 0.5),
        ("conv1", 0.25),
        ("fc", 0.0),
    ]


def test_the_manifest_module_does_not_import_torch() -> None:
    code = "import sys, service.engine.manifest; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_published_names_agree_with_the_pruning_tables() -> None:
    from service.engine.pruning import PUBLISHED_PROFILES

    assert set(PUBLISHED_PROFILE_NAMES) == set(PUBLISHED_PROFILES)
    for name, profile in PUBLISHED_PROFILES.items():
        assert name.split("-")[0] == profile.architecture


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


# (manifest text, the key the error must name, a piece of what it must say was expected)
BAD = {
    "not toml": ("architecture = resnet18 [", None, "not valid TOML"),
    "unknown key": ('colour = "red"\n' + GOOD, "colour", "unknown key"),
    "name differs from file": ('name = "other"\n' + GOOD, "name", "must equal the file name"),
    "no architecture": (_replace('architecture = "resnet18"\n', ""), "architecture", "missing"),
    "unknown architecture": (
        _replace('"resnet18"', '"resnet5"'),
        "architecture",
        "did you mean",
    ),
    "architecture not a string": (_replace('"resnet18"', "18"), "architecture", "expected"),
    "no weights table": (
        _replace('[weights]\nkind = "synthetic"\nseed = 7\n', ""),
        "weights",
        "[weights] table",
    ),
    "weights not a table": (
        'weights = "x"\n' + _replace('[weights]\nkind = "synthetic"\nseed = 7\n', ""),
        "weights",
        "[weights] table",
    ),
    "bad weights kind": (
        _replace('kind = "synthetic"', 'kind = "cloud"'),
        "weights.kind",
        "package",
    ),
    "file without path": (
        _replace('kind = "synthetic"\nseed = 7', 'kind = "file"'),
        "weights.path",
        "missing",
    ),
    "file that does not exist": (
        _replace('kind = "synthetic"\nseed = 7', 'kind = "file"\npath = "nope.pth"'),
        "weights.path",
        "does not exist",
    ),
    "path on synthetic": (_replace("seed = 7", 'seed = 7\npath = "x.pth"'), "weights.path", "only"),
    "seed on package": (
        _replace('kind = "synthetic"\nseed = 7', 'kind = "package"\nseed = 1'),
        "weights.seed",
        "only",
    ),
    "negative seed": (_replace("seed = 7", "seed = -1"), "weights.seed", "non-negative"),
    "float seed": (_replace("seed = 7", "seed = 0.5"), "weights.seed", "integer"),
    "unknown weights key": (_replace("seed = 7", "seed = 7\nsha = 1"), "weights.sha", "unknown"),
    "no pruning table": (
        _replace('[pruning]\nkind = "uniform"\nsparsity = 0.5\ninclude = "conv3x3"\n', ""),
        "pruning",
        "[pruning] table",
    ),
    "bad pruning kind": (_replace('kind = "uniform"', 'kind = "random"'), "pruning.kind", "none"),
    "uniform without sparsity": (_replace("sparsity = 0.5\n", ""), "pruning.sparsity", "missing"),
    "sparsity of 1": (_replace("sparsity = 0.5", "sparsity = 1.0"), "pruning.sparsity", "[0, 1)"),
    "sparsity in percent": (
        _replace("sparsity = 0.5", "sparsity = 90"),
        "pruning.sparsity",
        "[0, 1)",
    ),
    "sparsity as text": (
        _replace("sparsity = 0.5", 'sparsity = "high"'),
        "pruning.sparsity",
        "[0, 1)",
    ),
    "sparsity as bool": (
        _replace("sparsity = 0.5", "sparsity = true"),
        "pruning.sparsity",
        "[0, 1)",
    ),
    "bad include": (
        _replace('include = "conv3x3"', 'include = "conv5x5"'),
        "pruning.include",
        "conv1x1",
    ),
    "key of another kind": (
        _replace('include = "conv3x3"', 'include = "conv"\nname = "x"'),
        "pruning.name",
        "unknown key",
    ),
    "per_layer without layers": (
        _replace('kind = "uniform"\nsparsity = 0.5\ninclude = "conv3x3"', 'kind = "per_layer"'),
        "pruning.layers",
        "missing",
    ),
    "per_layer empty": (
        _replace(
            'kind = "uniform"\nsparsity = 0.5\ninclude = "conv3x3"',
            'kind = "per_layer"\n[pruning.layers]',
        ),
        "pruning.layers",
        "empty",
    ),
    "per_layer bad value": (
        _replace(
            'kind = "uniform"\nsparsity = 0.5\ninclude = "conv3x3"',
            'kind = "per_layer"\n[pruning.layers]\nconv1 = 1.5',
        ),
        "pruning.layers.conv1",
        "[0, 1)",
    ),
    "unknown published profile": (
        _replace(
            'kind = "uniform"\nsparsity = 0.5\ninclude = "conv3x3"',
            'kind = "published"\nname = "resnet18-magic"',
        ),
        "pruning.name",
        "vgg16-deepcompression",
    ),
    "published profile of another architecture": (
        _replace(
            'kind = "uniform"\nsparsity = 0.5\ninclude = "conv3x3"',
            'kind = "published"\nname = "vgg16-deepcompression"',
        ),
        "pruning.name",
        "is for vgg16, not resnet18",
    ),
    "no preprocessing": (
        GOOD[: GOOD.index("[preprocessing]")],
        "preprocessing",
        "[preprocessing] table",
    ),
    "no crop": (_replace("crop = 128\n", ""), "preprocessing.crop", "missing"),
    "crop larger than resize": (_replace("crop = 128", "crop = 224"), "preprocessing.crop", "fit"),
    "zero resize": (_replace("resize = 160", "resize = 0"), "preprocessing.resize", "positive"),
    "bool resize": (_replace("resize = 160", "resize = true"), "preprocessing.resize", "positive"),
    "two means": (_replace("mean = [1, 2, 3]", "mean = [1, 2]"), "preprocessing.mean", "3 numbers"),
    "mean as text": (_replace("mean = [1, 2, 3]", 'mean = "imagenet"'), "preprocessing.mean", "3"),
    "zero std": (
        _replace("std = [4.0, 5.0, 6.0]", "std = [4.0, 0, 6.0]"),
        "preprocessing.std",
        "positive",
    ),
    "unknown preprocessing key": (
        _replace("crop = 128", "crop = 128\nflip = true"),
        "preprocessing.flip",
        "unknown",
    ),
    "no labels": (_replace('labels = "labels.txt"\n', ""), "labels", "missing"),
    "missing label file": (_replace('"labels.txt"', '"nope.txt"'), "labels", "readable label file"),
    "labels as a list": (_replace('"labels.txt"', '["a", "b"]'), "labels", "imagenet"),
    "weights path absolute": (
        _replace('kind = "synthetic"\nseed = 7', 'kind = "file"\npath = "/etc/passwd"'),
        "weights.path",
        "outside the manifest's folder",
    ),
    "weights path up": (
        _replace('kind = "synthetic"\nseed = 7', 'kind = "file"\npath = "../../etc/passwd"'),
        "weights.path",
        "outside the manifest's folder",
    ),
    "labels path up": (_replace('"labels.txt"', '"../labels.txt"'), "labels", "outside"),
    "labels a folder": (_replace('"labels.txt"', '"."'), "labels", "is not a file"),
    "num_classes mismatch": ("num_classes = 1000\n" + GOOD, "num_classes", "labels list 10"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifests_name_file_key_and_expectation(tmp_path: Path, case: str) -> None:
    text, key, expected = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message
    assert info.value.key == key
    if key is not None:
        assert f": {key}:" in message


def test_an_empty_label_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    (tmp_path / "labels.txt").write_text("\n\n")
    with pytest.raises(ManifestError, match="holds no labels"):
        load_manifest(path)


def test_an_unknown_name_lists_the_manifests_there_are(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    with pytest.raises(ManifestError, match=r"no such manifest file .*: .*tiny.*\)") as info:
        load_manifest("huge", tmp_path)
    assert str(tmp_path / "huge.toml") in str(info.value)


def test_a_version_comes_from_the_file_name_or_the_key(tmp_path: Path) -> None:
    assert load_manifest(write(tmp_path, GOOD)).version == 1
    assert load_manifest(write(tmp_path, GOOD, name="tiny@2")).version == 2
    assert load_manifest(write(tmp_path, GOOD, name="tiny@2")).name == "tiny@2"
    assert load_manifest(write(tmp_path, "version = 3\n" + GOOD)).version == 3
    assert load_manifest(write(tmp_path, "version = 2\n" + GOOD, name="tiny@2")).version == 2


@pytest.mark.parametrize(
    ("name", "head", "key"),
    [("tiny@2", "version = 3\n", "version"), ("tiny@x", "", "name"),
     ("tiny@0", "", "name"), ("tiny", "version = 0\n", "version"),
     ("tiny", 'version = "2"\n', "version")],
)  # fmt: skip
def test_a_bad_version_names_the_key(tmp_path: Path, name: str, head: str, key: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, head + GOOD, name=name))
    assert info.value.key == key
