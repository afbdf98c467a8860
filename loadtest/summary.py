"""What a report says before its tables: the one-line conclusion, why a step came back empty,
and which points the plots draw. Pure functions of the report dict, so tests build reports by
hand and check the words."""

from __future__ import annotations

from typing import Any

Points = list[tuple[int, dict[str, Any]]]


def series(report: dict[str, Any]) -> dict[str, Points]:
    """(users, traffic stats) per line of the side-by-side view: a phase per backend in compare
    mode; in mixed mode, each backend's share of the mixed steps."""
    lines: dict[str, Points] = {}
    for step in report["steps"]:
        if report["mode"] == "compare":
            lines.setdefault(step["phase"], []).append((step["users"], step))
        elif len(step["by_backend"]) > 1:
            for backend, stats in step["by_backend"].items():
                lines.setdefault(backend, []).append((step["users"], stats))
        else:
            lines.setdefault(step["phase"], []).append((step["users"], step))
    return lines


def plotted_series(report: dict[str, Any]) -> dict[str, Points]:
    """series() without the points of no correct answer: a 0 img/s point would read as a
    measurement, when the step (its reason is in the report) measured nothing."""
    lines = {}
    for name, points in series(report).items():
        kept = [(users, stats) for users, stats in points if stats["ok"] > 0]
        if kept:
            lines[name] = kept
    return lines


def empty_step_reason(step: dict[str, Any], inflight: int | None, not_ready: str | None) -> str:
    """Why a step has no correct answer, in words; '' when it has some.

    `inflight` is how many requests were still unanswered when the window closed (None when the
    driver cannot tell), `not_ready` what /v2/health/ready said right after the step (None: 200).
    """
    if step["ok"] > 0:
        return ""
    window = f"{step['window_s']:.1f} s window"
    if not_ready:
        why = f"the server was not ready ({not_ready})"
        if step["requests"]:
            statuses = ", ".join(f"{k}: {v}" for k, v in step["errors"].items())
            why += f"; all {step['requests']} requests failed ({statuses})"
        return why
    if step["requests"]:
        statuses = ", ".join(f"{code}: {count}" for code, count in step["errors"].items())
        return f"all {step['requests']} requests failed (status {statuses}; 0 means no answer)"
    if inflight:
        return (
            f"no request finished in the {window}: {inflight} still in flight at its end "
            "(answers slower than the window; lengthen LOADTEST_DURATION_S)"
        )
    if inflight is None:
        return f"no request finished in the {window} (still in flight at its end, or none sent)"
    return f"no request was sent in the {window}"


def _phase_at(lines: dict[str, Points], name: str, users: int) -> dict[str, Any] | None:
    return next((s for u, s in lines.get(name, []) if u == users and s["ok"] > 0), None)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def conclusion(report: dict[str, Any]) -> str:
    """The report's first line. Compare mode: the fastest backend against each other one at the
    concurrency of its best step; otherwise the best step's throughput and p99."""
    answered = [s for s in report["steps"] if s["ok"] > 0]
    if not answered:
        reasons = [s.get("empty_reason") for s in report["steps"] if s.get("empty_reason")]
        return "No step got a correct answer" + (f": {reasons[0]}." if reasons else ".")
    best = max(answered, key=lambda step: step["images_per_s"])
    users, rate, p99 = best["users"], best["images_per_s"], best["latency_ms"]["p99"]
    lines = series(report)  # every backend, those with no correct answer too
    if report["mode"] != "compare" or len(lines) < 2:
        where = best["phase"]
        if where == "mixed":
            where = "mixed over " + (", ".join(report["backends"]) or "the default backend")
        return f"Best step: {rate:,.0f} img/s at {users} users ({where}), p99 {_ms(p99)} ms."
    name, parts = best["phase"], []
    for other in (line for line in lines if line != name):
        theirs = _phase_at(lines, other, users)
        if theirs is None:
            parts.append(f"{name} {rate:,.0f} img/s at {users} users, {other} no correct answer")
            continue
        ratio = rate / max(theirs["images_per_s"], 1e-9)
        parts.append(
            f"{name} {ratio:.{2 if ratio < 1.1 else 1}f}x {other} at {users} users "
            f"({rate:,.0f} vs {theirs['images_per_s']:,.0f} img/s), "
            f"p99 {_ms(p99)} vs {_ms(theirs['latency_ms']['p99'])} ms"
        )
    return "; ".join(parts)


def title_suffix(report: dict[str, Any]) -> str:
    """`on <device>, <backends>` for plot titles, so a figure says where it was measured."""
    device = (report.get("server") or {}).get("device") or "unknown device"
    backends = report.get("backends") or (report.get("server") or {}).get("backends") or []
    mode = " (mixed)" if report.get("mode") == "mixed" and len(backends) > 1 else ""
    return f"on {device}, {' vs '.join(backends) or 'default backend'}{mode}"
