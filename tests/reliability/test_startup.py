"""Start-up faults: a bad tuning cache, a bad cache folder, bad manifests.

A bad tuning cache (valid JSON of the wrong shape, a FIFO, a folder in its place) is logged,
set aside and rebuilt, and the service starts. Bad manifests (TOML syntax, wrong types, missing
fields, missing or unreadable weights, an unknown architecture, a file outside the manifest's
folder) stop `escort serve` with one error line each and a non-zero exit before it binds its
port. The servers here run the real torch engine on CPU with a small model (32x32 images)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from service.core.preflight import cache_dir_problem
from service.engine.autotune import CACHE_FORMAT, TuningCache
from tests.service.servers import REPO, ProcessServer

TINY = """architecture = "resnet18"
labels = "imagenet"
[weights]
kind = "synthetic"
[pruning]
kind = "uniform"
sparsity = 0.8
[preprocessing]
resize = 32
crop = 32
mean = [123.675, 116.28, 103.53]
std = [58.395, 57.12, 57.375]
"""
READY_TIMEOUT_S = 60.0
GOOD_ENTRY = {"dense": 1e-4, "sparse": 2e-4, "choice": "dense"}


def _env(models_dir: Path, cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCORT_")}
    env.update(
        ESCORT_MODELS="tiny",
        ESCORT_MODELS_DIR=str(models_dir),
        ESCORT_CACHE_DIR=str(cache_dir),
        ESCORT_DEVICE="cpu",
        ESCORT_BACKEND="auto",  # the backend that reads and writes the tuning cache
        ESCORT_BACKENDS="auto",
        ESCORT_WORKERS="1",
        ESCORT_MAX_BATCH_SIZE="2",
    )
    env.update(extra)
    return env


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.toml").write_text(TINY)
    return folder


def _set_aside(cache: Path) -> list[Path]:
    return sorted(cache.parent.glob(cache.name + ".bad-*"))


def _assert_rebuilt(cache: Path) -> None:
    """A regular file of the right shape, with the decisions of this start in it."""
    assert stat.S_ISREG(os.lstat(cache).st_mode)
    data = json.loads(cache.read_text())
    assert data["format"] == CACHE_FORMAT and data["entries"]
    for entry in data["entries"].values():
        assert entry["choice"] in ("dense", "sparse")


def _cache_in(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh cache folder, and where the service keeps its tuning cache in it."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    return cache_dir, cache_dir / "autotune.json"


# --- the tuning cache, in a real server ----------------------------------------------------


def test_a_tuning_cache_of_the_wrong_shape_is_set_aside_and_rebuilt(
    tmp_path: Path, models_dir: Path
) -> None:
    cache_dir, cache = _cache_in(tmp_path)
    bad = json.dumps({"format": CACHE_FORMAT, "entries": [1, 2]})
    cache.write_text(bad)
    env = _env(models_dir, cache_dir)
    with ProcessServer("service.app", env, ready_timeout_s=READY_TIMEOUT_S) as server:
        with server.client() as client:
            assert client.get("/v2/models/tiny/ready").status_code == 200
        output = server.output()
    _assert_rebuilt(cache)
    aside = _set_aside(cache)
    assert len(aside) == 1 and aside[0].read_text() == bad, output
    assert any("WARNING" in line and "tuning cache" in line for line in output.splitlines())
    assert "Traceback" not in output


def test_a_fifo_in_place_of_the_tuning_cache_does_not_hang_start_up(
    tmp_path: Path, models_dir: Path
) -> None:
    cache_dir, cache = _cache_in(tmp_path)
    os.mkfifo(cache)  # nobody ever writes it: a blocking open would wait forever
    env = _env(models_dir, cache_dir)
    with ProcessServer("service.app", env, ready_timeout_s=READY_TIMEOUT_S) as server:
        output = server.output()
    _assert_rebuilt(cache)
    aside = _set_aside(cache)
    assert len(aside) == 1 and stat.S_ISFIFO(os.lstat(aside[0]).st_mode), output


def test_a_cache_dir_that_is_a_file_is_a_warning_not_a_crash(
    tmp_path: Path, models_dir: Path
) -> None:
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file, not a folder")
    # dense: nothing to tune, so the start is quick; the check of the folder is the same
    env = _env(models_dir, not_a_dir, ESCORT_BACKEND="dense", ESCORT_BACKENDS="dense")
    with ProcessServer("service.app", env, ready_timeout_s=READY_TIMEOUT_S) as server:
        with server.client() as client:
            assert client.get("/v2/health/ready").status_code == 200
        output = server.output()
    warned = [line for line in output.splitlines() if "ESCORT_CACHE_DIR" in line]
    assert len(warned) == 1 and "WARNING" in warned[0], output
    assert not_a_dir.read_text() == "a file, not a folder"
    assert "Traceback" not in output


# --- the tuning cache, directly: every bad shape, a FIFO, a folder -----------------------

BAD_CACHES = {
    "a list": b"[1, 2]",
    "a string": b'"cache"',
    "null": b"null",
    "entries a list": json.dumps({"format": CACHE_FORMAT, "entries": [1, 2]}).encode(),
    "an entry a number": json.dumps({"format": CACHE_FORMAT, "entries": {"k": 5}}).encode(),
    "a time a string": json.dumps(
        {"format": CACHE_FORMAT, "entries": {"k": {**GOOD_ENTRY, "dense": "1.0"}}}
    ).encode(),
    "a time a bool": json.dumps(
        {"format": CACHE_FORMAT, "entries": {"k": {**GOOD_ENTRY, "sparse": True}}}
    ).encode(),
    "an unknown choice": json.dumps(
        {"format": CACHE_FORMAT, "entries": {"k": {**GOOD_ENTRY, "choice": "magic"}}}
    ).encode(),
    "a choice missing": json.dumps(
        {"format": CACHE_FORMAT, "entries": {"k": {"dense": 1.0, "sparse": 2.0}}}
    ).encode(),
    "nested too deep": b"[" * 200_000,
    "not UTF-8": b"\xff\xfe{}",
    "not JSON": b"{not json",
}


@pytest.mark.parametrize("content", BAD_CACHES.values(), ids=BAD_CACHES.keys())
def test_a_bad_tuning_cache_file_is_set_aside(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "autotune.json"
    path.write_bytes(content)
    cache = TuningCache(path)
    assert cache.get("k") is None
    assert [p.read_bytes() for p in _set_aside(path)] == [content]
    cache.put("new", GOOD_ENTRY)
    cache.save()
    assert TuningCache(path).get("new") == GOOD_ENTRY


def test_good_entries_survive_beside_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "autotune.json"
    entries = {"good": GOOD_ENTRY, "bad": {"dense": -1.0, "sparse": 1.0, "choice": "dense"}}
    path.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}))
    cache = TuningCache(path)
    assert cache.get("good") == GOOD_ENTRY and cache.get("bad") is None
    assert len(_set_aside(path)) == 1
    cache.save()  # nothing new tuned, but the set-aside file is rebuilt with what was good
    assert TuningCache(path).get("good") == GOOD_ENTRY


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_tuning_cache_that_is_not_a_file_is_set_aside_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "autotune.json"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    caches: list[TuningCache] = []
    reader = threading.Thread(target=lambda: caches.append(TuningCache(path)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked opening the FIFO: give it a writer so the thread ends
        os.close(os.open(path, os.O_RDWR))
    assert caches, "reading the tuning cache blocked"
    assert caches[0].entries == {} and len(_set_aside(path)) == 1
    caches[0].put("k", GOOD_ENTRY)
    caches[0].save()
    assert TuningCache(path).get("k") == GOOD_ENTRY


def test_the_cache_dir_check_names_what_is_wrong(tmp_path: Path) -> None:
    assert cache_dir_problem(str(tmp_path / "new" / "cache")) is None  # created when needed
    assert cache_dir_problem(str(tmp_path)) is None
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "not a folder" in (cache_dir_problem(str(a_file)) or "")
    assert "not a folder" in (cache_dir_problem(str(a_file / "below")) or "")


# --- manifests: refused before the port is bound ------------------------------------------


CKPT = '[weights]\nkind = "file"\npath = "{}"'
BAD_MANIFESTS = {
    # name: (text, what its one error line must say)
    "syntax": ('architecture = "resnet18\n', "not valid TOML"),
    "wrongtype": (TINY.replace("crop = 32", 'crop = "big"'), "preprocessing.crop"),
    "nopreprocessing": (TINY.split("[preprocessing]")[0], "preprocessing: missing"),
    "noweights": (TINY.replace('[weights]\nkind = "synthetic"', CKPT.format("gone.pth")), "gone"),
    "notackpt": (
        TINY.replace('[weights]\nkind = "synthetic"', CKPT.format("junk.pth")),
        "not a torch checkpoint",
    ),
    "unknownarch": (TINY.replace('"resnet18"', '"resnet5O"'), "unknown architecture"),
    "dotdot": (
        TINY.replace('[weights]\nkind = "synthetic"', CKPT.format("../../../../etc/passwd")),
        "outside",
    ),
    "absolute": (
        TINY.replace('[weights]\nkind = "synthetic"', CKPT.format("/etc/passwd")),
        "outside",
    ),
    "labelsout": (TINY.replace('labels = "imagenet"', 'labels = "../../etc/hostname"'), "outside"),
}


def test_bad_manifests_stop_start_up_before_the_port_is_bound(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name, (text, _) in BAD_MANIFESTS.items():
        (folder / f"{name}.toml").write_text(text)
    (folder / "junk.pth").write_text("not a checkpoint")
    # Hold the port: a server that bound it before checking would fail with "cannot listen".
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    env = _env(folder, tmp_path / "cache", ESCORT_MODELS=",".join(BAD_MANIFESTS))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "service.app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
    finally:
        holder.close()
    output = proc.stdout.decode(errors="replace")
    assert proc.returncode != 0, output
    assert "Traceback" not in output and "cannot listen" not in output, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    for name, (_, says) in BAD_MANIFESTS.items():
        naming = [line for line in errors if f"{name}.toml" in line]
        assert len(naming) == 1 and says in naming[0], (name, output)
    assert "serving on" not in output
