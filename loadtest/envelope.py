"""Latency below saturation: each think-time step's p99 against 2 x (batch delay + batch).

Issue 10's bound: at about 70% of saturation, p99 within twice the batcher's delay plus one
full batch's compute. A request that arrives just after a batch left waits at most the delay,
then the batch on the device, then its own: two batches and a delay; twice that leaves room
for the HTTP hops. "Saturation" is the best rate of the backend's back-to-back steps, and the
full batch's compute is the server's own mean batch time at that step (its batches are full
there). The delay comes from the server's Triton model config (`dynamic_batching`).
"""

from __future__ import annotations

from typing import Any

from loadtest.promtext import get_json

TARGET_SHARE = 0.7  # the share of saturation the bound is stated at


def batch_delay_ms(url: str, model: str, api_key: str = "", timeout_s: float = 10.0):
    """ESCORT_MAX_BATCH_DELAY_MS as the server reports it; None when it does not say."""
    try:
        config = get_json(f"{url}/v2/models/{model}/config", timeout_s, api_key)
        return config["dynamic_batching"]["max_queue_delay_microseconds"] / 1000.0
    except (OSError, ValueError, KeyError, TypeError):
        return None


def envelope_section(steps: list[dict[str, Any]], delay_ms: float | None) -> dict[str, Any]:
    """One row per think-time step: its share of the best rate, p99, and the bound."""
    rows = []
    for phase in dict.fromkeys(step["phase"] for step in steps):
        mine = [s for s in steps if s["phase"] == phase and s.get("ok")]
        flat = [s for s in mine if not s.get("think_ms")]
        if not flat:
            continue
        best = max(flat, key=lambda s: s["images_per_s"])
        full_ms = _compute_ms(best)
        for step in mine:
            if not step.get("think_ms"):
                continue
            bound = None
            if delay_ms is not None and full_ms is not None:
                bound = 2.0 * (delay_ms + full_ms)
            p99 = step["latency_ms"]["p99"]
            rows.append({
                "phase": phase, "users": step["users"], "think_ms": step["think_ms"],
                "share": step["images_per_s"] / best["images_per_s"],
                "p99_ms": p99, "step_compute_ms": _compute_ms(step),
                "full_batch_ms": full_ms, "bound_ms": bound,
                "within": None if bound is None or p99 is None else p99 <= bound,
            })  # fmt: skip
    return {"delay_ms": delay_ms, "target_share": TARGET_SHARE, "rows": rows}


def _compute_ms(step: dict[str, Any]) -> float | None:
    values = list((step.get("server") or {}).get("mean_compute_ms", {}).values())
    return sum(values) / len(values) if values else None


def envelope_markdown(report: dict[str, Any]) -> list[str]:
    section = report.get("latency_envelope")
    if not section or not section["rows"]:
        return []
    delay = section["delay_ms"]
    out = [
        "## Latency below saturation",
        "",
        f"p99 of each think-time step against 2 x (batch delay + full batch): delay "
        f"{'unknown' if delay is None else f'{delay:g} ms'} (the server's config); full batch: "
        "the server's mean batch time at the backend's best back-to-back step. The bound is "
        f"stated at {section['target_share']:.0%} of that step's rate.",
        "",
        "| phase | users | share of best rate | p99 ms | bound ms | within | step's batch ms "
        "| full batch ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        within = "-" if r["within"] is None else ("yes" if r["within"] else "no")
        out.append(
            f"| {r['phase']} | {r['users']} (think {r['think_ms']}) | {r['share']:.0%} | "
            f"{_f(r['p99_ms'])} | {_f(r['bound_ms'])} | {within} | "
            f"{_f(r['step_compute_ms'], 2)} | {_f(r['full_batch_ms'], 2)} |"
        )
    return out + [""]


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
