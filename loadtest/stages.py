"""Where a request's time goes, from the server's own stage metrics: receive, parse and encode
in the HTTP workers (per request), queue (per image), h2d, replay and d2h on the device (per
batch, from CUDA events on the engine's streams), and the whole batch (compute); the means of
each step, and the p99 of each stage (which part makes a slow request slow)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loadtest.promtext import Scrape, counter_by, histogram_by, histogram_quantile

# In the order a request meets them; queue and compute come from their own metrics.
STAGES = (
    "receive",
    "parse",
    "to_engine",
    "queue",
    "wait",
    "h2d",
    "replay",
    "d2h",
    "compute",
    "back",
    "dispatch",
    "encode",
    "profile",
)
# The stages whose tails the p99 table shows: each request's parts in the worker and the
# engine (the device stages are per batch and steady; the tail is in the hand-offs or not).
TAIL_STAGES = ("receive", "parse", "to_engine", "queue", "wait", "compute", "back", "dispatch")


def _per_stage(
    delta: Scrape, model: str, read: Callable[[dict[str, Any]], float | None]
) -> dict[str, dict[str, float]]:
    """backend -> stage -> read(histogram) in ms, over one step (stages without samples, or
    with nothing to read, are left out)."""
    groups = histogram_by(
        delta, "escort_stage_duration_seconds", ("backend", "stage"), {"model": model}
    )
    out: dict[str, dict[str, float]] = {}
    for (backend, stage), hist in groups.items():
        value = read(hist) if hist["count"] else None
        if value is not None:
            out.setdefault(backend, {})[stage] = value * 1e3
    return out


def stage_means(delta: Scrape, model: str) -> dict[str, dict[str, float]]:
    """backend -> stage -> mean ms over one step."""
    return _per_stage(delta, model, lambda hist: float(hist["mean"]))


def stage_quantiles(delta: Scrape, model: str, q: float = 0.99) -> dict[str, dict[str, float]]:
    """backend -> stage -> the q-quantile in ms over one step, from the histogram's buckets
    (Prometheus's interpolation: read it to a bucket's width)."""
    return _per_stage(delta, model, lambda hist: histogram_quantile(q, hist["buckets"]))


def users_label(step: dict[str, Any]) -> str:
    """A step's users, with their think time when they pause between requests."""
    think = step.get("think_ms")
    return f"{step['users']} (think {think})" if think else str(step["users"])


def cores_busy(delta: Scrape, window_s: float) -> dict[str, float]:
    """role -> CPU cores its processes kept busy over one step (escort_process_cpu_seconds,
    refreshed every second or two by each process, so a short step reads a little rough)."""
    by_role = counter_by(delta, "escort_process_cpu_seconds_total", ("role",))
    return {role: seconds / max(window_s, 1e-9) for (role,), seconds in sorted(by_role.items())}


def worker_spread(
    delta: Scrape, window_s: float, during: Scrape | None = None
) -> dict[str, list[float]]:
    """Each HTTP worker's cores busy over one step and its open connections (from `during`, a
    scrape taken while the step ran, else the delta's closing scrape) (escort_worker_cpu_seconds
    and escort_worker_connections, one series per worker), each list sorted: is the load spread
    evenly, or is one worker the tail?"""
    cpu = counter_by(delta, "escort_worker_cpu_seconds_total", ("worker",))
    held = during if during is not None else delta
    connections = counter_by(held, "escort_worker_connections", ("worker",))
    return {
        "cores": sorted(seconds / max(window_s, 1e-9) for seconds in cpu.values()),
        "connections": sorted(connections.values()),
    }


def _spread(values: list[float] | None, digits: int) -> str:
    if not values:
        return "-"
    middle = values[len(values) // 2]
    return " / ".join(f"{v:.{digits}f}" for v in (values[0], middle, values[-1]))


def cores_markdown(report: dict[str, Any]) -> list[str]:
    """Which process kind was busy in each step, and the load generator's own CPU."""
    rows = []
    for step in report["steps"]:
        cores = step["server"].get("cores_busy") or {}
        generator = (step.get("driver") or {}).get("cores_busy")
        if not cores and generator is None:
            continue
        spread = step["server"].get("workers") or {}
        cells = [_cell(cores.get("engine")), _cell(cores.get("worker")), _cell(generator),
                 _spread(spread.get("cores"), 2), _spread(spread.get("connections"), 0)]  # fmt: skip
        rows.append(f"| {step['phase']} | {step['users']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    note = (
        "CPU cores kept busy over each step: the engine core process (one event loop and the "
        "batchers' threads), the HTTP workers together, and the load generator's own processes; "
        "then per HTTP worker, least / median / most: its cores busy, and the connections it "
        "held halfway through the step (wrk) or at its end (Locust); a keep-alive connection "
        "stays on the worker that accepted it."
    )
    head = (
        "| phase | users | engine cores | worker cores | load generator cores "
        "| per worker cores | per worker connections |"
    )
    return ["## CPU by process", "", note, "", head, "|---|---|---|---|---|---|---|", *rows, ""]


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
        "metric (ESCORT_LAYER_PROFILE_EVERY) run eagerly (the CPU, or a bucket without a timed "
        "graph), device time that the batches behind it wait."
    )
    return ["## Where the time goes", "", note, "", head, rule, *[r + " |" for r in rows], ""]


def tails_markdown(report: dict[str, Any]) -> list[str]:
    """p99 of each part of a request beside the client's and the server's p99, per step and
    backend: where the tail lives (the client, the worker, the hand-offs, queue or device)."""
    rows = []
    for step in report["steps"]:
        server = step["server"]
        for backend, tails in sorted((server.get("p99_stage_ms") or {}).items()):
            values = dict(tails)
            values["queue"] = server.get("queue_p99_ms")
            values["compute"] = (server.get("compute_p99_ms") or {}).get(backend)
            cells = [_cell(_client_p99(step, backend)),
                     _cell((server.get("request_p99_ms") or {}).get(backend))]  # fmt: skip
            cells += [_cell(values.get(stage)) for stage in TAIL_STAGES]
            rows.append(
                f"| {step['phase']} | {users_label(step)} | {backend} | " + " | ".join(cells) + " |"
            )
    if not rows:
        return []
    head = (
        "| phase | users | backend | client ms | server ms | "
        + " | ".join(f"{s} ms" for s in TAIL_STAGES)
        + " |"
    )
    rule = "|" + "---|" * (5 + len(TAIL_STAGES))
    note = (
        "p99 of each step: at the load generator (client), over the server's whole request "
        "(server), and of each part on its own (from the stage histograms; queue per image, "
        "wait and compute per batch). The parts' p99s do not add up to the whole's; the part "
        "whose p99 stands out over its mean (the table above) is where slow requests lose time."
    )
    return ["## Where the tail goes", "", note, "", head, rule, *rows, ""]


def _client_p99(step: dict[str, Any], backend: str) -> float | None:
    """The load generator's p99 for one backend's requests in a step."""
    own = (step.get("by_backend") or {}).get(backend)
    if own is None and step.get("phase") != backend:
        return None
    return ((own or step).get("latency_ms") or {}).get("p99")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
