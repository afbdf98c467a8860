"""Where a request's time goes, from the server's own stage metrics: receive, parse and encode
in the HTTP workers (per request), queue (per image), h2d, replay and d2h on the device (per
batch, from CUDA events on the engine's streams), and the whole batch (compute)."""

from __future__ import annotations

from typing import Any

from loadtest.promtext import Scrape, histogram_by

# In the order a request meets them; queue and compute come from their own metrics.
STAGES = ("receive", "parse", "queue", "h2d", "replay", "d2h", "compute", "encode")


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
        "image; h2d/replay/d2h: per batch, device time; compute: per batch as the batcher saw "
        "it (h2d, replay, d2h and the hand-offs)."
    )
    return ["## Where the time goes", "", note, "", head, rule, *[r + " |" for r in rows], ""]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
