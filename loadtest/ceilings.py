"""Ceilings beside the results: how fast the load generator can send (against loadtest.sink) and
how fast the server's HTTP layer answers with no compute (against a server on ESCORT_ENGINE=null,
LOADTEST_CEILING_URL). Both are measured with the same driver and bodies as the real steps, at
the largest step's concurrency, before them. A step's rate says something about the server only
when the generator could have sent at least twice as much (GENERATOR_MARGIN).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

GENERATOR_MARGIN = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Sink:
    """`python -m loadtest.sink` on a free loopback port, for the length of a `with`."""

    def __init__(self, processes: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "loadtest.sink", "--port", str(self.port)]
        if processes:
            self.argv += ["--processes", str(processes)]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sink:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RuntimeError(
                    f"loadtest.sink exited {self.process.returncode}: {error[-500:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("loadtest.sink did not listen within 20 s")

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def wait_ready(url: str, timeout_s: float) -> None:
    """Until the null-engine server answers /v2/health/ready, or raise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"answered {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"LOADTEST_CEILING_URL {url} not ready after {timeout_s:.0f} s ({last})")


def ceiling_entry(target: str, url: str, users: int, traffic: dict[str, Any]) -> dict[str, Any]:
    """One ceiling run: answered requests per second (any status: the rate is the point), and
    what part of them were correct."""
    window = max(float(traffic["window_s"]), 1e-9)
    answered = traffic["requests"] - sum(
        n
        for kind, n in traffic["errors"].items()
        if kind in ("0", "connect", "read", "write", "timeout")
    )
    return {
        "target": target,
        "url": url,
        "users": users,
        "window_s": window,
        "requests": traffic["requests"],
        "ok": traffic["ok"],
        "rps": max(0, answered) / window,
        "errors": traffic["errors"],
        "latency_ms": traffic["latency_ms"],
        # Which processes were busy (wrk's and, for a server, its roles'), when measured.
        "generator_cores": traffic.get("generator_cores"),
        "server_cores": traffic.get("server_cores") or {},
    }


def ceilings_section(
    generator: dict[str, Any] | None, http: dict[str, Any] | None, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    """The report's `ceilings`: both rates, and per step its generator ratio and HTTP share."""
    rows = []
    for step in steps:
        achieved = step["requests"] / max(step["window_s"], 1e-9)
        rows.append({
            "step": step["step"],
            "phase": step["phase"],
            "users": step["users"],
            "achieved_rps": achieved,
            "generator_ratio": generator["rps"] / achieved if generator and achieved else None,
            "http_fraction": achieved / http["rps"] if http and http["rps"] else None,
        })  # fmt: skip
    ratios = [(r["generator_ratio"], r) for r in rows if r["generator_ratio"] is not None]
    if not generator:
        ok, verdict = None, "Load generator ceiling not measured (LOADTEST_SINK=1 measures it)."
    elif not ratios:
        ok, verdict = None, "No step answered, so no ratio to the load generator's ceiling."
    else:
        low, row = min(ratios, key=lambda item: item[0])
        ok = low >= GENERATOR_MARGIN
        verdict = (
            f"Load generator {'not the bottleneck' if ok else 'MAY BE THE BOTTLENECK'}: its ceiling "
            f"{generator['rps']:.0f} req/s is {low:.2f}x the busiest step ({row['phase']}, "
            f"{row['users']} users, {row['achieved_rps']:.0f} req/s); at least "
            f"{GENERATOR_MARGIN:.0f}x is needed."
        )
    return {
        "load_generator": generator,
        "http_layer": http,
        "load_generator_rps": generator["rps"] if generator else None,
        "http_layer_rps": http["rps"] if http else None,
        "steps": rows,
        "generator_not_bottleneck": ok,
        "verdict": verdict,
    }


def _cores(entry: dict[str, Any]) -> str:
    """'; cores busy: ...' for a ceiling whose processes were measured, else nothing."""
    parts = [f"{role} {cores:.2f}" for role, cores in sorted(entry.get("server_cores", {}).items())]
    if entry.get("generator_cores") is not None:
        parts.append(f"load generator {entry['generator_cores']:.2f}")
    return "; cores busy: " + ", ".join(parts) if parts else ""


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ceilings_markdown(report: dict[str, Any]) -> list[str]:
    section = report.get("ceilings")
    if not section:
        return []
    out = ["## Ceilings", ""]
    for key, name, how in (("load_generator", "Load generator", "against loadtest.sink"),
                           ("http_layer", "HTTP layer", "against the null engine")):  # fmt: skip
        entry = section[key]
        if entry:
            out.append(f"- {name} ({how}, {entry['users']} users): **{entry['rps']:.0f} req/s**, "
                       f"p50 {_f(entry['latency_ms']['p50'], 2)} ms, errors {entry['errors'] or 'none'}"
                       f"{_cores(entry)}.")  # fmt: skip
        else:
            out.append(f"- {name}: not measured.")
    out += ["", section["verdict"], "", "| phase | users | achieved req/s | generator ceiling / "
            "achieved | achieved / HTTP ceiling |", "|---|---|---|---|---|"]  # fmt: skip
    for row in section["steps"]:
        out.append(f"| {row['phase']} | {row['users']} | {_f(row['achieved_rps'])} | "
                   f"{_f(row['generator_ratio'], 2)} | {_f(row['http_fraction'], 2)} |")  # fmt: skip
    return out + [""]
