"""Multi-GPU scaling: the same load test against 1 GPU and against N, one engine per GPU.

`python -m loadtest.scaling` starts the servers itself, on loopback:
- replicas (default): N server processes pinned with ESCORT_DEVICE=cuda:i on ports
  LOADTEST_BASE_PORT + i, with the load spread over them (LOADTEST_URL gets every replica, and
  /metrics is scraped from each), as a load balancer in front of replicas would;
- one-process (LOADTEST_SCALING_MODE=one-process): one server that sees N GPUs
  (CUDA_VISIBLE_DEVICES=0..N-1), for an engine that spreads its batches over them.
Concurrency scales with the GPUs (each LOADTEST_USERS step times N), so every GPU sees the same
load per GPU in both runs. Each run writes its full report under LOADTEST_OUT/gpus-<n>/; the
comparison goes to LOADTEST_OUT/scaling.{json,md} and scaling.png: peak throughput per backend,
its ratio, and p99 at equal load per GPU.

Settings: LOADTEST_GPUS (default 2), LOADTEST_SCALING_MODE, LOADTEST_BASE_PORT (8001),
LOADTEST_SERVER_CMD (default `<python> -m service.cli serve`; `{port}` is replaced), plus every
LOADTEST_* of loadtest.run and the ESCORT_* settings, which the servers inherit.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from loadtest.config import (
    LoadtestConfigError,
    load_config,
    load_settings,
    unknown_setting_warnings,
)

SCALING_JSON = "scaling.json"
SCALING_MD = "scaling.md"
SCALING_PNG = "scaling.png"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _servers(count_gpus: int, mode: str, base_port: int, command: str) -> list[dict[str, Any]]:
    """What to start for a run on `count_gpus` GPUs: port and extra environment per process."""
    if mode == "one-process":
        visible = ",".join(str(i) for i in range(count_gpus))
        return [{"port": base_port, "env": {"CUDA_VISIBLE_DEVICES": visible}}]
    return [
        {"port": base_port + i, "env": {"ESCORT_DEVICE": f"cuda:{i}"}} for i in range(count_gpus)
    ]


def _start(spec: dict[str, Any], command: str, log_path: Path) -> subprocess.Popen:
    # The load test speaks HTTP: the replicas' gRPC endpoints stay off (one port each less).
    env = {**os.environ, "ESCORT_HOST": "127.0.0.1", "ESCORT_PORT": str(spec["port"]),
           "ESCORT_GRPC": "false", **spec["env"]}  # fmt: skip
    argv = shlex.split(command.replace("{port}", str(spec["port"])))
    with log_path.open("wb") as sink:
        return subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _wait_ready(process: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def run_on(count_gpus: int, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Start the servers for `count_gpus`, run the load test against them, stop them."""
    folder = out / f"gpus-{count_gpus}"
    folder.mkdir(parents=True, exist_ok=True)
    specs = _servers(count_gpus, settings["mode"], settings["base_port"], settings["command"])
    urls = [f"http://127.0.0.1:{spec['port']}" for spec in specs]
    processes = []
    try:
        for index, spec in enumerate(specs):
            processes.append(_start(spec, settings["command"], folder / f"server-{index}.log"))
        for process, url in zip(processes, urls, strict=True):
            _wait_ready(process, url, settings["ready_timeout_s"])
        users = ",".join(str(u * count_gpus) for u in settings["users"])
        env = {**os.environ, "LOADTEST_URL": ",".join(urls), "LOADTEST_USERS": users,
               "LOADTEST_OUT": str(folder), "LOADTEST_METRICS_URLS": ""}  # fmt: skip
        log(f"scaling: {count_gpus} GPU(s), {len(specs)} server(s), users {users}")
        result = subprocess.run([sys.executable, "-m", "loadtest.run"], env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the load test on {count_gpus} GPU(s) exited {result.returncode}")
    finally:
        _stop(processes)
    return json.loads((folder / "report.json").read_text())


def _by_backend(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per backend, its stats at each step (compare mode: its phase; mixed: its share)."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for step in report["steps"]:
        if report["mode"] == "compare":
            lines.setdefault(step["phase"], []).append({**step, "users": step["users"]})
        else:
            for backend, stats in step["by_backend"].items():
                lines.setdefault(backend, []).append({**stats, "users": step["users"]})
    return lines


def compare(one: dict[str, Any], many: dict[str, Any], count_gpus: int) -> dict[str, Any]:
    """Peak throughput ratio and the p99 at the highest equal-per-GPU load, per backend."""
    rows = {}
    base_lines, scaled_lines = _by_backend(one), _by_backend(many)
    for backend, base in base_lines.items():
        scaled = scaled_lines.get(backend, [])
        if not scaled:
            continue
        peak_1 = max(s["images_per_s"] for s in base)
        peak_n = max(s["images_per_s"] for s in scaled)
        top_1, top_n = base[-1], scaled[-1]  # the last step: the same users per GPU
        p99_1, p99_n = top_1["latency_ms"]["p99"], top_n["latency_ms"]["p99"]
        rows[backend] = {
            "peak_images_per_s": {"1": peak_1, str(count_gpus): peak_n},
            "throughput_ratio": peak_n / peak_1 if peak_1 else None,
            "p99_ms_at_top_step": {"1": p99_1, str(count_gpus): p99_n},
            "p99_ratio": p99_n / p99_1 if p99_1 and p99_n else None,
            "users_at_top_step": {"1": top_1["users"], str(count_gpus): top_n["users"]},
            "curve": {
                "1": [(s["users"], s["images_per_s"]) for s in base],
                str(count_gpus): [(s["users"] / count_gpus, s["images_per_s"]) for s in scaled],
            },
        }
    return rows


def to_markdown(summary: dict[str, Any]) -> str:
    n = str(summary["gpus"])
    out = [
        f"# Scaling over {n} GPUs ({summary['mode']})",
        "",
        f"Model {summary['model']}; target ratio {summary['target_ratio']}x with p99 no worse.",
        "",
        f"| backend | 1 GPU img/s | {n} GPUs img/s | ratio | p99 ms 1 GPU | p99 ms {n} GPUs "
        "| p99 ratio | meets target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend, row in summary["backends"].items():
        peak, p99 = row["peak_images_per_s"], row["p99_ms_at_top_step"]
        ratio, p99_ratio = row["throughput_ratio"] or 0.0, row["p99_ratio"]
        ok = ratio >= summary["target_ratio"] and p99_ratio is not None and p99_ratio <= 1.0
        out.append(
            f"| {backend} | {peak['1']:.1f} | {peak[n]:.1f} | {ratio:.2f} | "
            f"{p99['1'] or 0:.1f} | {p99[n] or 0:.1f} | "
            f"{p99_ratio if p99_ratio is None else f'{p99_ratio:.2f}'} | {'yes' if ok else 'no'} |"
        )
    out += ["", f"Full reports: gpus-1/report.md and gpus-{n}/report.md.", "",
            f"![scaling]({SCALING_PNG})", ""]  # fmt: skip
    return "\n".join(out)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (backend, row) in enumerate(summary["backends"].items()):
        for gpus, style in (("1", "--"), (str(summary["gpus"]), "-")):
            xs, ys = zip(*row["curve"][gpus], strict=True) if row["curve"][gpus] else ((), ())
            ax.plot(xs, ys, style, marker="o", color=f"C{index}", label=f"{backend}, {gpus} GPU")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent users per GPU")
    ax.set_ylabel("images per second")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{summary['model']}: throughput on 1 and {summary['gpus']} GPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    for line in unknown_setting_warnings():
        log(f"scaling: warning: {line}")
    try:
        config = load_config()
        typed = load_settings()  # LOADTEST_GPUS, _SCALING_MODE, _BASE_PORT, _SERVER_CMD
    except LoadtestConfigError as exc:
        log(f"scaling: {exc}")
        return 2
    gpus, mode = typed.gpus, typed.scaling_mode
    settings = {
        "mode": mode,
        "base_port": typed.base_port,
        "command": typed.server_cmd or f"{sys.executable} -m service.cli serve",
        "users": config.users,
        "ready_timeout_s": config.ready_timeout_s,
    }
    out = Path(config.out)
    try:
        one = run_on(1, out, settings)
        many = run_on(gpus, out, settings)
    except RuntimeError as exc:
        log(f"scaling: {exc}")
        return 1
    summary = {
        "gpus": gpus,
        "mode": mode,
        "model": one["model"],
        "target_ratio": 0.9 * gpus,
        "backends": compare(one, many, gpus),
    }
    (out / SCALING_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot(summary, out / SCALING_PNG)
    except ImportError:
        log("scaling: matplotlib is missing; scaling.png skipped")
    (out / SCALING_MD).write_text(to_markdown(summary))
    print(to_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
