"""Where a request's time goes, from the server's own stage metrics: receive, parse and encode
in the HTTP workers (per request), queue (per image), h2d, replay and d2h on the device (per
batch, from CUDA events on the engine's streams), and the whole batch (compute)."""

from __future__ import annotations

from typing import Any

from loadtest.promtext import Scrape, counter_by, histogram_by

# In the order a request meets them; queue and compute come from their own metrics.
STAGES = (
    "receive",
    "parse",
    "queue",
    "h2d",
    "replay",
    "d2h",
    "compute",
    "dispatch",
    "encode",
    "profile",
)


def stage_means(delta: Scrape, model: str) -> dict[str, dict[str, float]]:
    """backend -> stage -> mean ms over one step (stages without samples are left out)."""
    groups = histogram_by(
        delta, "escort_stage_duration_seconds", ("backend", "stage"), {"model": model}
    )
    out: dict[str, dict[str, float]] = {}
    for (backend, stage), hist in groups.items():
        if hist["count"]:
            out.setdefault(backend, {})[stage] = float(hist["mean"]) * 1e3
    return out


def cores_busy(delta: Scrape, window_s: float) -> dict[str, float]:
    """role -> CPU cores its processes kept busy over one step (escort_process_cpu_seconds,
    refreshed every second or two by each process, so a short step reads a little rough)."""
    by_role = counter_by(delta, "escort_process_cpu_seconds_total", ("role",))
    return {role: seconds / max(window_s, 1e-9) for (role,), seconds in sorted(by_role.items())}


def cores_markdown(report: dict[str, Any]) -> list[str]:
    """Which process kind was busy in each step, and the load generator's own CPU."""
    rows = []
    for step in report["steps"]:
        cores = step["server"].get("cores_busy") or {}
        generator = (step.get("driver") or {}).get("cores_busy")
        if not cores and generator is None:
            continue
        cells = [_cell(cores.get("engine")), _cell(cores.get("worker")), _cell(generator)]
        rows.append(f"| {step['phase']} | {step['users']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    note = (
        "CPU cores kept busy over each step: the engine core process (one event loop and the "
        "batchers' threads), the HTTP workers together, and the load generator's own processes."
    )
    head = "| phase | users | engine cores | worker cores | load generator cores |"
    return ["## CPU by process", "", note, "", head, "|---|---|---|---|---|", *rows, ""]


def stages_markdown(report: dict[str, Any]) -> list[str]:
    """A table per step and backend, or nothing when the server exported no stage times."""
    rows = []
    for step in report["steps"]:
        server = step["server"]
        for backend, stages in sorted((server.get("mean_stage_ms") or {}).items()):
            values = dict(stages)
            values["queue"] = server.get("mean_queue_ms")
            values["compute"] = (server.get("mean_compute_ms") or {}).get(backend)
            cells = [_cell(values.get(stage)) for stage in STAGES]
            rows.append(f"| {step['phase']} | {step['users']} | {backend} | " + " | ".join(cells))
    if not rows:
        return []
    head = "| phase | users | backend | " + " | ".join(f"{s} ms" for s in STAGES) + " |"
    rule = "|" + "---|" * (3 + len(STAGES))
    note = (
        "Means over each step. receive/parse/encode: per request in an HTTP worker; queue: per "
        "image; wait: per batch, how long one launched early waited for the batch before it; "
        "h2d/replay/d2h: per batch, device time; compute: per batch as the batcher saw "
        "it (h2d, replay, d2h and the hand-offs); profile: per sampled pass of the per-layer "
        "metric (ESCORT_LAYER_PROFILE_EVERY), device time that the batches behind it wait."
    )
    return ["## Where the time goes", "", note, "", head, rule, *[r + " |" for r in rows], ""]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
