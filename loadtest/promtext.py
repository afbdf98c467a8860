"""Scrape /metrics and turn the change between two scrapes into per-step server facts.

The load test reads the server's own histograms instead of guessing: the mean batch size comes
from `escort_batch_size` and per-layer latency from `escort_layer_duration_seconds`, each as the
difference of `_sum` and `_count` between the scrapes that bracket a step. `get_json` reads the
server's other endpoints (model listing, metadata, config) the same way, with the API key.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

LabelSet = tuple[tuple[str, str], ...]
SampleKey = tuple[str, LabelSet]
Scrape = dict[SampleKey, float]

# Samples that only grow (until a restart); the rest (gauges) are read as they are.
_CUMULATIVE_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


def parse_metrics(text: str) -> Scrape:
    """Every sample of a text exposition, keyed by name and sorted labels."""
    scrape: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            scrape[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return scrape


def _read(url: str, accept: str, timeout_s: float, api_key: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - loopback only
        return response.read()


def fetch_metrics(url: str, timeout_s: float = 10.0, api_key: str = "") -> Scrape:
    return parse_metrics(_read(url, "text/plain", timeout_s, api_key).decode("utf-8"))


def get_json(url: str, timeout_s: float = 10.0, api_key: str = "") -> Any:
    return json.loads(_read(url, "application/json", timeout_s, api_key))


def scrape_all(urls: Iterable[str], timeout_s: float = 10.0, api_key: str = "") -> list[Scrape]:
    """One scrape per URL; a URL that fails gives an empty scrape rather than stopping the run."""
    scrapes = []
    for url in urls:
        try:
            scrapes.append(fetch_metrics(url, timeout_s, api_key))
        except OSError:
            scrapes.append({})
    return scrapes


def delta(before: Scrape, after: Scrape) -> Scrape:
    """What changed between two scrapes of one server. A counter that went down means the server
    restarted in between; its value after the restart is then the best estimate."""
    out: Scrape = {}
    for key, value in after.items():
        if key[0].endswith(_CUMULATIVE_SUFFIXES):
            previous = before.get(key, 0.0)
            out[key] = value - previous if value >= previous else value
        else:
            out[key] = value
    return out


def delta_all(before: list[Scrape], after: list[Scrape]) -> Scrape:
    """Per-server deltas summed over replicas (histograms and counters aggregate by adding)."""
    total: Scrape = defaultdict(float)
    for one_before, one_after in zip(before, after, strict=True):
        for key, value in delta(one_before, one_after).items():
            total[key] += value
    return dict(total)


def _matches(labels: LabelSet, where: Mapping[str, str]) -> bool:
    found = dict(labels)
    return all(found.get(name) == value for name, value in where.items())


def counter_by(
    scrape: Scrape, name: str, by: tuple[str, ...], where: Mapping[str, str] | None = None
) -> dict[tuple[str, ...], float]:
    """Sum a counter's samples grouped by the labels in `by`."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for (sample, labels), value in scrape.items():
        if sample != name or not _matches(labels, where or {}):
            continue
        found = dict(labels)
        out[tuple(found.get(label, "") for label in by)] += value
    return dict(out)


def histogram_by(
    scrape: Scrape, name: str, by: tuple[str, ...], where: Mapping[str, str] | None = None
) -> dict[tuple[str, ...], dict[str, object]]:
    """A histogram's count, sum, mean and cumulative buckets, grouped by the labels in `by`."""
    groups: dict[tuple[str, ...], dict[str, object]] = {}
    for (sample, labels), value in scrape.items():
        if not sample.startswith(name) or not _matches(labels, where or {}):
            continue
        suffix = sample[len(name) :]
        if suffix not in ("_count", "_sum", "_bucket"):
            continue
        found = dict(labels)
        key = tuple(found.get(label, "") for label in by)
        group = groups.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": defaultdict(float)})
        if suffix == "_bucket":
            group["buckets"][found["le"]] += value  # type: ignore[index]
        else:
            group[suffix[1:]] = float(group[suffix[1:]]) + value  # type: ignore[arg-type]
    for group in groups.values():
        count = float(group["count"])  # type: ignore[arg-type]
        group["mean"] = float(group["sum"]) / count if count > 0 else None  # type: ignore[arg-type]
        buckets = group["buckets"]
        group["buckets"] = dict(sorted(buckets.items(), key=lambda item: _le(item[0])))  # type: ignore[union-attr]
    return groups


def _le(text: str) -> float:
    return math.inf if text in ("+Inf", "inf") else float(text)


def histogram_quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative buckets: linear within the bucket."""
    pairs = sorted((_le(le), count) for le, count in buckets.items())
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in pairs:
        if count >= rank:
            if math.isinf(upper):
                return lower_bound  # above the last finite bucket: its bound is all we know
            if count == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = upper, count
    return pairs[-1][0]


def bucket_counts(buckets: Mapping[str, float]) -> dict[str, float]:
    """Cumulative buckets turned into the count that fell in each bucket."""
    out: dict[str, float] = {}
    previous = 0.0
    for le, cumulative in sorted(buckets.items(), key=lambda item: _le(item[0])):
        out[le] = cumulative - previous
        previous = cumulative
    return out
