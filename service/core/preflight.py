"""What `escort serve` checks before it binds its port: the manifests of the models to serve,
the weights they name, and the cache folder.

A mistake in a manifest (TOML syntax, a wrong type, a missing field, missing or unreadable
weights, an unknown architecture, a file outside the manifest's folder) stops the start with
one line per manifest and exit status 1, before any port is bound or process spawned: an
orchestrator sees a failed start, never a server that answers /live and then dies. A cache
folder the service cannot write is only a warning: tuning decisions are then not kept.

The manifests are read in a spawned child: checking an architecture name imports torchvision,
which would add ~800 MB to the supervisor for the rest of its life.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from service.config import Settings

log = logging.getLogger("escort.supervisor")

# Reading manifests takes seconds (torchvision's import); a child stuck far longer (a hung
# network mount) is given up on, and the engine's own load reports what is wrong.
CHECK_TIMEOUT_S = 120.0


def startup_problems(settings: Settings, check_models: bool) -> list[str]:
    """One line per mistake that must stop the start (the caller logs them). `check_models`:
    the engine reads the models' manifests (the torch and null engines do; a test's fake
    engine may serve names that have none)."""
    if not check_models:
        return []
    if settings.engine == "torch":
        problem = cache_dir_problem(settings.cache_dir)
        if problem is not None:
            log.warning(
                "ESCORT_CACHE_DIR=%s: %s; tuning decisions will not be kept (each start "
                "tunes again)",
                settings.cache_dir,
                problem,
            )
    return manifest_problems(settings.models, settings.models_dir, settings.engine == "torch")


def cache_dir_problem(folder: str) -> str | None:
    """Why the service could not write into `folder` (created when needed), or None."""
    probe = Path(folder).expanduser()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # the folder is made on first save: its nearest existing parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def manifest_problems(models: Sequence[str], models_dir: str, weights: bool) -> list[str]:
    """The mistakes in the models' manifests (and, with `weights`, their weights), read in a
    spawned child process."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_check_manifests,
        args=(send, tuple(models), models_dir, weights),
        name="escort-preflight",
        daemon=True,
    )
    child.start()
    send.close()
    try:
        if receive.poll(CHECK_TIMEOUT_S):
            problems, unexpected = receive.recv()
        else:
            problems, unexpected = [], [f"no answer in {CHECK_TIMEOUT_S:.0f} s"]
    except EOFError:  # the child died without answering
        problems, unexpected = [], ["the checking process exited"]
    finally:
        receive.close()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join(5)
    for text in unexpected:
        log.warning("could not check the manifests before start-up (%s); loading anyway", text)
    return problems


def _check_manifests(
    conn: Connection, models: tuple[str, ...], models_dir: str, weights: bool
) -> None:
    """In the child: (one line per bad manifest, unexpected failures)."""
    from service.engine.engine import check_known
    from service.engine.errors import UnknownModelError
    from service.engine.loader import CheckpointError, check_weights
    from service.engine.manifest import ManifestError, load_manifest

    problems: list[str] = []
    unexpected: list[str] = []
    for name in models:
        try:
            check_known(name, models_dir)
            manifest = load_manifest(name, models_dir)
            if weights:
                try:
                    check_weights(manifest)
                except (CheckpointError, ImportError) as exc:
                    problems.append(f"{manifest.source}: weights: {exc}")
        except (UnknownModelError, ManifestError) as exc:
            problems.append(str(exc))
        except Exception as exc:  # a bug here must not stop a start the engine may manage
            unexpected.append(f"{name}: {type(exc).__name__}: {exc}")
    conn.send((problems, unexpected))
    conn.close()
