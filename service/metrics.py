"""Every Prometheus metric of the service, in one place.

Each app owns a ServiceMetrics with its own CollectorRegistry, so that tests can build several
apps in one process. Histograms, not summaries, so that replicas aggregate. Label values for
`model` only ever come from the configured models, never from a request path, which keeps the
number of series bounded whatever clients send.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# Set (by the supervisor, before any process imports prometheus_client) when the service runs
# as several processes: each one writes its samples to files there, and a scrape of any HTTP
# worker adds them all up. Gauges then say how processes combine (livesum / livemax).
MULTIPROC_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"

# Request latency from a millisecond (cached small batch on a GPU) to the longest deadline.
# Fine from 5 to 50 ms, where a p99 against a batcher's bound of a few batches is read.
REQUEST_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Preprocessing of one image: JPEG decode plus resize, a few ms for a phone photo.
PREPROCESS_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Single conv layers on a GPU take microseconds; on the CPU reference, up to a second.
LAYER_BUCKETS_S = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
# Stages of the serving path: microseconds (a device copy) to tens of milliseconds (a hand-off
# that stalled), fine enough in between for the load test to read each stage's p99.
STAGE_BUCKETS_S = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 1e-2, 1.5e-2,
    2e-2, 2.5e-2, 3e-2, 4e-2, 5e-2, 7.5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
# overloaded: refused at admission because the queue ahead would take it past its deadline.
REJECT_REASONS = (
    "queue_full", "overloaded", "deadline", "client_disconnected", "shutting_down", "not_ready",
)  # fmt: skip
# Which process of the layout a process_* sample comes from (see refresh_process).
PROCESS_ROLES = ("engine", "worker")


class ProcessStats(NamedTuple):
    resident_bytes: float
    cpu_seconds: float
    open_fds: float


def read_process_stats() -> ProcessStats | None:
    """This process's resident memory, user+system CPU time and open fds, from /proc (what
    prometheus_client's process collector reads, which multiprocess mode does not export).
    None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # The command name (field 2) may hold spaces: count fields after its ")".
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open("/proc/self/status", "rb") as status:
            rss_kib = next(int(line.split()[1]) for line in status if line.startswith(b"VmRSS:"))
        open_fds = len(os.listdir("/proc/self/fd"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    return ProcessStats(float(rss_kib * 1024), cpu_seconds, float(open_fds))


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the first one at or above max_batch_size."""
    buckets = [1.0]
    while buckets[-1] < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class ServiceMetrics:
    """The service's metric objects, registered in a registry of their own."""

    def __init__(self, max_batch_size: int = 32) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "escort_requests",
            "Inference requests answered, by model, backend, protocol (v1, v2, grpc) and HTTP code (over gRPC: the code REST gives the same outcome).",
            ["model", "backend", "protocol", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "escort_request_duration_seconds",
            "Time from receiving an inference request to sending its answer.",
            ["model", "backend"],
            buckets=REQUEST_BUCKETS_S,
            registry=reg,
        )
        self.queue_duration = Histogram(
            "escort_queue_duration_seconds",
            "Time an image waited in the batcher before its batch started.",
            ["model"],
            buckets=REQUEST_BUCKETS_S,
            registry=reg,
        )
        self.preprocess_duration = Histogram(
            "escort_preprocess_duration_seconds",
            "Time to decode, resize and normalize one image.",
            ["model"],
            buckets=PREPROCESS_BUCKETS_S,
            registry=reg,
        )
        self.compute_duration = Histogram(
            "escort_compute_duration_seconds",
            "Engine time per batch.",
            ["model", "backend"],
            buckets=REQUEST_BUCKETS_S,
            registry=reg,
        )
        self.batch_size = Histogram(
            "escort_batch_size",
            "Images per engine batch.",
            ["model", "backend"],
            buckets=batch_size_buckets(max_batch_size),
            registry=reg,
        )
        self.queue_depth = Gauge(
            "escort_queue_depth",
            "Images waiting in the batchers of a model.",
            ["model"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "escort_rejected",
            "Requests refused or dropped before compute, by reason.",
            ["model", "reason"],
            registry=reg,
        )
        self.connections_refused = Counter(
            "escort_connections_refused",
            "Connections the HTTP layer answered and closed itself, before any route, by reason "
            "(max_connections 503, header_too_large 431, header_timeout 408, bad_request 400).",
            ["reason"],
            registry=reg,
        )
        self.layer_duration = Histogram(
            "escort_layer_duration_seconds",
            "Sampled time of one layer on one batch.",
            ["model", "backend", "layer", "op"],
            buckets=LAYER_BUCKETS_S,
            registry=reg,
        )
        self.layer_timings = Counter(
            "escort_layer_timings",
            "Layer timings in escort_layer_duration_seconds, by the batch size the sampled "
            "batch ran at (its CUDA-graph bucket on a GPU): what to compare a layer benchmark "
            "at.",
            ["model", "backend", "batch"],
            registry=reg,
        )
        self.stage_duration = Histogram(
            "escort_stage_duration_seconds",
            "Time of one stage of the serving path: receive, parse, dispatch, encode (per "
            "request, HTTP worker; dispatch: the engine's round trip, to_engine and back: its "
            "hand-offs); wait (per batch launched "
            "early, for the batch before it); h2d, replay, d2h (per batch, device time on the engine's streams); profile "
            "(per eager sampled pass of the per-layer metric: CPU, or a bucket without a timed graph).",
            ["model", "backend", "stage"],
            buckets=STAGE_BUCKETS_S,
            registry=reg,
        )
        self.layer_sparsity = Gauge(
            "escort_layer_sparsity",
            "Fraction of zero weights in a layer.",
            ["model", "layer"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.model_ready = Gauge(
            "escort_model_ready",
            "1 when the model is loaded and warmed, else 0.",
            ["model"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.batch_failures = Counter(
            "escort_batch_failures",
            "Engine batches that raised or returned a wrong number of results.",
            ["model", "backend"],
            registry=reg,
        )
        self.inflight = Gauge(
            "escort_inflight_requests",
            "Inference requests being handled now.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.device_memory = Gauge(
            "escort_device_memory_bytes",
            "Device memory of the engine, by device and kind (allocated, reserved, free, total).",
            ["device", "kind"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        # Per process of the layout, added up over the live processes of each role.
        self.process_resident_memory = Gauge(
            "escort_process_resident_memory_bytes",
            "Resident memory of the service's processes, summed per role (engine, worker).",
            ["role"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.process_cpu = Counter(
            "escort_process_cpu_seconds",
            "User and system CPU time of the service's processes, summed per role.",
            ["role"],
            registry=reg,
        )
        self.process_open_fds = Gauge(
            "escort_process_open_fds",
            "Open file descriptors of the service's processes, summed per role.",
            ["role"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.processes = Gauge(
            "escort_processes",
            "Live processes of each role (the engine core process, the HTTP workers).",
            ["role"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._cpu_reported = 0.0
        # One series per HTTP worker (label worker: its pid; not "pid", which multiprocess
        # mode strips from gauges): how evenly the listener's connections spread over the
        # workers, and how busy each one was.
        self.worker_connections = Gauge(
            "escort_worker_connections",
            "Open HTTP connections of each HTTP worker (label worker: its process id).",
            ["worker"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.worker_cpu = Counter(
            "escort_worker_cpu_seconds",
            "CPU time of each HTTP worker (label worker: its process id); the load test reads "
            "each worker's busy share of a step from it.",
            ["worker"],
            registry=reg,
        )
        # Set by the server that owns the connections (service.app.serve): their number now.
        self.connection_count: Callable[[], int] | None = None

    def refresh_process(self, role: str) -> None:
        """Record this process's memory, CPU time and fds under `role` (engine or worker).
        Cheap (three small /proc reads); call it at scrape time and every few seconds.

        In one process (no PROMETHEUS_MULTIPROC_DIR) that process is both the engine and the
        HTTP server: it reports only as `worker`, so that the two roles never count it twice."""
        if role not in PROCESS_ROLES:
            raise ValueError(f"role must be one of {PROCESS_ROLES}, not {role!r}")
        if role == "engine" and not os.environ.get(MULTIPROC_DIR_VAR):
            return
        stats = read_process_stats()
        if stats is None:
            return
        self.processes.labels(role).set(1)
        self.process_resident_memory.labels(role).set(stats.resident_bytes)
        self.process_open_fds.labels(role).set(stats.open_fds)
        # A counter only goes up by deltas; this object's process started it at zero.
        delta = stats.cpu_seconds - self._cpu_reported
        pid = str(os.getpid())
        if delta > 0:
            self.process_cpu.labels(role).inc(delta)
            if role == "worker":
                self.worker_cpu.labels(pid).inc(delta)
            self._cpu_reported = stats.cpu_seconds
        if role == "worker" and self.connection_count is not None:
            self.worker_connections.labels(pid).set(self.connection_count())

    def record_memory(self, stats: Mapping[str, Mapping[str, float]]) -> None:
        """The engine's `memory_stats()`, refreshed by whoever runs the engine."""
        for device, kinds in stats.items():
            for kind, value in kinds.items():
                self.device_memory.labels(str(device), str(kind)).set(float(value))

    def observe_stage(self, model: str, backend: str, stage: str, seconds: float) -> None:
        """One stage's time (the engine's stage observer, and the routes')."""
        self.stage_duration.labels(model, backend, stage).observe(seconds)

    def observe_layer(
        self, model: str, backend: str, layer: str, op: str, seconds: float, batch: int
    ) -> None:
        """The engine's layer observer: one sampled layer timing, of a batch of `batch`."""
        self.layer_duration.labels(model, backend, layer, op).observe(seconds)
        self.layer_timings.labels(model, backend, str(batch)).inc()

    def prepare_model(self, model: str, backends: Iterable[str], sparsity: Mapping[str, float]):
        """Create a model's series up front, so that dashboards see zeros rather than gaps."""
        self.model_ready.labels(model).set(0)
        self.queue_depth.labels(model)
        self.queue_duration.labels(model)
        self.preprocess_duration.labels(model)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)
        for backend in backends:
            self.batch_size.labels(model, backend)
            self.compute_duration.labels(model, backend)
            self.request_duration.labels(model, backend)
        for layer, fraction in sparsity.items():
            self.layer_sparsity.labels(model, layer).set(float(fraction))

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type: this process's metrics, or every
        process's added up when the service runs as several."""
        self.refresh_process("worker")  # the answering worker's numbers, fresh at scrape time
        folder = os.environ.get(MULTIPROC_DIR_VAR)
        if not folder:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        return generate_latest(registry), CONTENT_TYPE_LATEST
