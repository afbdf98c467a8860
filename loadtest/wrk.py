"""wrk as the load generator: find the binary, write its Lua script, run it, read its result.

Locust (gevent, Python) sends a few hundred 602 KB requests a second per core, well under what a
GPU server answers; wrk (C, epoll, one event loop per thread) sends the same bytes at many times
that rate. Its Lua script POSTs prebuilt bodies, formatted once per thread; with a single body
wrk's static path sends the same buffer again and again, so no Lua runs per request except the
answer's status count. `done()` prints one JSON line, which `parse_output` turns into numbers.
Plain stdlib: no Locust, so tests import it directly.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Where loadtest/unpack_debs.sh puts an unpacked wrk when the machine has none installed.
DEB_ROOTS = (ROOT / ".gpu-debs" / "root", Path("/tmp/debs"))
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib", "lib")
MARKER = "ESCORT_WRK_JSON "
# The Lua script, with @SPECS@, @BUDGET@ and @MARKER@ filled in by lua_script().
SCRIPT_TEMPLATE = Path(__file__).with_name("wrk_script.lua")
# Socket-level failures wrk counts (no HTTP answer); Locust's status "0".
SOCKET_ERRORS = ("connect", "read", "write", "timeout")


class WrkMissing(RuntimeError):
    """No usable wrk binary; the message says where it looked."""


@dataclass(frozen=True)
class WrkBinary:
    path: str
    env: dict[str, str] = field(default_factory=dict)  # LD_LIBRARY_PATH for an unpacked .deb


def _lib_env(binary: Path) -> dict[str, str]:
    """LD_LIBRARY_PATH for a wrk unpacked from .debs (<root>/usr/bin/wrk), set for wrk alone so
    that the unpacked libraries never replace the system's in the Python processes."""
    if binary.parent.name != "bin" or binary.parent.parent.name != "usr":
        return {}
    root = binary.parent.parent.parent
    if root == Path("/"):
        return {}
    dirs = [str(root / d) for d in LIB_DIRS if (root / d).is_dir()]
    if not dirs:
        return {}
    inherited = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": ":".join(dirs + ([inherited] if inherited else []))}


def find_wrk(setting: str = "") -> WrkBinary:
    """LOADTEST_WRK when set, else `wrk` on PATH, else an unpacked .deb under DEB_ROOTS."""
    if setting:
        path = Path(setting).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise WrkMissing(f"LOADTEST_WRK={setting!r} is not an executable file")
        return WrkBinary(str(path), _lib_env(path.resolve()))
    found = shutil.which("wrk")
    if found:
        return WrkBinary(found, _lib_env(Path(found).resolve()))
    for root in DEB_ROOTS:
        candidate = root / "usr" / "bin" / "wrk"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return WrkBinary(str(candidate), _lib_env(candidate))
    raise WrkMissing(
        "LOADTEST_DRIVER=wrk but no wrk binary: set LOADTEST_WRK, install wrk (apt-get install "
        "wrk), or unpack the .debs with `bash loadtest/unpack_debs.sh` (looked in "
        + ", ".join(str(r / "usr/bin/wrk") for r in DEB_ROOTS)
        + ")"
    )


@dataclass(frozen=True)
class RequestSpec:
    """One prebuilt request: what wrk sends, and what the report files it under."""

    path: str  # path and query, e.g. /v2/models/m/infer
    headers: dict[str, str]
    body: bytes
    protocol: str = "v2"
    backend: str = "default"
    images: int = 1


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII text is a valid Lua string literal


def lua_script(
    body_files: list[str], specs: list[RequestSpec], thread_budget: int = 0, think_ms: float = 0
) -> str:
    """The Lua script for `specs`, whose bodies lie in `body_files`. `thread_budget` > 0 stops
    each wrk thread after that many answers (the step's LOADTEST_MAX_REQUESTS share);
    `think_ms` > 0 pauses each connection a random time of that mean before each request."""
    if not specs or len(body_files) != len(specs):
        raise ValueError("one body file per request spec, at least one")
    entries = []
    for file, spec in zip(body_files, specs, strict=True):
        headers = ", ".join(
            f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in spec.headers.items()
        )
        entries.append(f"  {{path = {_lua_string(spec.path)}, file = {_lua_string(file)}, "
                       f"headers = {{{headers}}}}},")  # fmt: skip
    specs_lua = "\n".join(entries)
    return (
        SCRIPT_TEMPLATE.read_text()
        .replace("@SPECS@", specs_lua)
        .replace("@BUDGET@", str(int(thread_budget)))
        .replace("@THINK_MS@", repr(float(think_ms)))
        .replace("@MARKER@", MARKER)
    )


def parse_output(text: str) -> dict[str, Any]:
    """The JSON line `done()` printed (the last one, should wrk print more), with `ok` (2xx
    answers that passed the check) and `errors` as the report counts them: non-2xx by status,
    socket failures by kind, and `bad_answer` for a 2xx without a classification."""
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise ValueError(f"no {MARKER.strip()} line in wrk's output:\n{text[-2000:]}")
    data = json.loads(lines[-1][len(MARKER) :])
    statuses = {code: int(n) for code, n in data.get("statuses", {}).items()}
    two_xx = sum(n for code, n in statuses.items() if 200 <= int(code) < 300)
    kinds = data["errors"]
    errors = {code: n for code, n in statuses.items() if not 200 <= int(code) < 300 and n}
    errors.update({kind: int(kinds[kind]) for kind in SOCKET_ERRORS if kinds.get(kind)})
    if kinds.get("bad_answer"):
        errors["bad_answer"] = int(kinds["bad_answer"])
    data["statuses"] = statuses
    data["ok"] = max(0, two_xx - int(kinds.get("bad_answer", 0)))
    data["errors"] = dict(sorted(errors.items()))
    return data


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several wrk runs side by side (one per target URL) as one. Counts add up; the latency
    quantiles are the request-weighted mean of each run's (an estimate: wrk gives no buckets)."""
    if len(results) == 1:
        return results[0]
    total = sum(r["requests"] for r in results) or 1
    latency = {
        key: sum(r["latency_s"][key] * r["requests"] for r in results) / total
        for key in results[0]["latency_s"]
    }
    latency["max"] = max(r["latency_s"]["max"] for r in results)
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for r in results:
        for source, target in ((r["errors"], errors), (r["statuses"], statuses)):
            for key, n in source.items():
                target[key] = target.get(key, 0) + n
    return {
        "requests": sum(r["requests"] for r in results),
        "ok": sum(r["ok"] for r in results),
        "duration_s": max(r["duration_s"] for r in results),
        "budget_reached": all(r.get("budget_reached") for r in results),
        "bytes": sum(r["bytes"] for r in results),
        "errors": dict(sorted(errors.items())),
        "statuses": statuses,
        "latency_s": latency,
    }


def split(total: int, parts: int) -> list[int]:
    """`total` spread as evenly as possible over `parts` (the first ones get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_wrk(
    binary: WrkBinary,
    urls: tuple[str, ...],
    specs: list[RequestSpec],
    connections: int,
    max_threads: int,
    duration_s: float,
    timeout_s: float,
    budget: int = 0,
    think_ms: float = 0,
) -> dict[str, Any]:
    """One wrk per target URL, all at once, with the connections split over them; returns the
    merged result. wrk takes whole seconds, so the duration is rounded (at least 1 s)."""
    seconds = max(1, round(duration_s))
    targets = [u for u, c in zip(urls, split(connections, len(urls)), strict=True) if c]
    shares = [c for c in split(connections, len(urls)) if c]
    with tempfile.TemporaryDirectory(prefix="escort-wrk-") as folder:
        files = []
        for index, spec in enumerate(specs):
            files.append(str(Path(folder) / f"body-{index}.bin"))
            Path(files[-1]).write_bytes(spec.body)
        env = {**os.environ, **binary.env}
        processes = []
        for url, share, thread_cap in zip(
            targets, shares, split(max_threads, len(targets)), strict=True
        ):
            threads = max(1, min(share, thread_cap))
            per_thread = math.ceil(budget * share / connections / threads) if budget else 0
            script = Path(folder) / f"script-{len(processes)}.lua"
            script.write_text(lua_script(files, specs, per_thread, think_ms))
            argv = [binary.path, "-t", str(threads), "-c", str(share), "-d", f"{seconds}s",
                    "--timeout", f"{max(1, math.ceil(timeout_s))}s", "-s", str(script), url]  # fmt: skip
            processes.append(
                subprocess.Popen(
                    argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        results = []
        children_before = _children_cpu_s()
        for process in processes:
            out, err = process.communicate(timeout=seconds + timeout_s + 60)
            if process.returncode != 0:
                raise RuntimeError(f"wrk exited {process.returncode}: {err.strip() or out[-500:]}")
            try:
                results.append(parse_output(out))
            except ValueError as exc:  # a Lua error: wrk says so on stderr and carries on
                raise RuntimeError(f"{exc}\nwrk's stderr: {err.strip()}") from None
    merged = merge(results)
    # What the load generator itself used: these wrk processes are this one's only children
    # waited on meanwhile, so their CPU time is what RUSAGE_CHILDREN gained.
    merged["cpu_s"] = _children_cpu_s() - children_before
    return merged


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
