"""`auto`: time each conv layer dense and sparse at load, keep the faster, remember the choice.

On CUDA each op is timed as the runner will run it: captured in a CUDA graph (so launch
overhead, which the graph removes, does not decide), at every batch bucket, in the model's
precision. On CPU a quick measure at batch 1 decides for all buckets. Decisions are cached in
a JSON file keyed by device, precision, batch, the layer's geometry and a hash of its sparsity
pattern; an identical layer of any model reuses them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import stat
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from service.engine.backends import ConvLayer, ConvOp, precision_scope

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# (op, layer, batch) -> seconds for one call. Tests inject their own.
Timer = Callable[[ConvOp, ConvLayer, int], float]
# layer -> {bucket: {"dense": s, "sparse": s, "choice": name}}
LayerTimings = dict[int, dict[str, float | str]]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # CPU timings depend on the core type and the thread count torch uses.
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def kernel_version() -> str:
    """A digest of every kernel variant's source and parameter struct (variants.py): a
    decision timed against other kernels is not reused."""
    try:
        from service.kernels.variants import KERNEL_VERSION  # noqa: PLC0415 - optional part
    except ImportError:
        return "none"
    return KERNEL_VERSION


def tuning_key(device: str, precision: str, layer: ConvLayer, batch: int) -> str:
    g = layer.geometry
    shape = (
        f"c{g.in_channels}-o{g.out_channels}-k{g.kernel[0]}x{g.kernel[1]}-s{g.stride[0]}x{g.stride[1]}"
        f"-p{'.'.join(map(str, g.padding))}-d{g.dilation[0]}x{g.dilation[1]}-g{g.groups}"
        f"-hw{g.in_hw[0]}x{g.in_hw[1]}-{g.epilogue}"
    )
    return f"{device}|{precision}|kernel{kernel_version()}|b{batch}|{shape}|{layer.pattern_hash()}"


def choose(dense_s: float, sparse_s: float) -> str:
    """Sparse only when it is measurably faster: a tie keeps cuDNN, the safer path."""
    return "sparse" if sparse_s < dense_s else "dense"


# A real cache holds a few hundred entries of ~200 bytes; a file far larger is not one.
MAX_CACHE_BYTES = 64 << 20
CHOICES = ("dense", "sparse")


class TuningCache:
    """A JSON file of decisions. Several replicas may share it, so writes merge with what is on
    disk and replace the file atomically. A file that is not a cache (not JSON, the wrong shape,
    a FIFO or a folder in its place) is logged and renamed aside, never fatal: a cache only
    saves time, and one bad shared file must not stop every replica from starting."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.dirty = False
        self.entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            # Non-blocking: opening a FIFO for reading would otherwise wait for a writer.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return {}  # nothing cached yet (a cache dir that is a file: save() says so)
        except OSError as exc:
            self._set_aside(None, f"cannot be opened ({exc.strerror})")
            return {}
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            self._set_aside(info, "is not a regular file")
            return {}
        with os.fdopen(fd, "rb") as fh:
            if info.st_size > MAX_CACHE_BYTES:
                self._set_aside(info, f"is larger than {MAX_CACHE_BYTES >> 20} MiB")
                return {}
            try:
                data = json.loads(fh.read(MAX_CACHE_BYTES + 1))
            except OSError as exc:
                self._set_aside(info, f"cannot be read ({exc.strerror})")
                return {}
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                self._set_aside(info, f"is not JSON ({type(exc).__name__})")
                return {}
        if isinstance(data, dict) and isinstance(data.get("format"), int):
            if data["format"] != CACHE_FORMAT:
                return {}  # another version's cache: not ours to judge, save() replaces it
            entries = data.get("entries")
            if isinstance(entries, dict):
                good = {k: v for k, v in entries.items() if _valid_entry(v)}
                if len(good) < len(entries):
                    self._set_aside(info, f"has {len(entries) - len(good)} malformed entries")
                    self.dirty = bool(good)  # rebuild the file with the good ones
                return good
        self._set_aside(info, f'is not {{"format": {CACHE_FORMAT}, "entries": {{...}}}}')
        return {}

    def _set_aside(self, seen: os.stat_result | None, problem: str) -> None:
        """Rename the bad file so the next save writes a fresh one and a person can look at
        what was there. Only the file that was read: a replica that rebuilt it meanwhile keeps
        its good one."""
        assert self.path is not None
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        aside = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        try:
            now = os.lstat(self.path)
            if seen is not None and (now.st_ino, now.st_dev) != (seen.st_ino, seen.st_dev):
                return
            os.rename(self.path, aside)
        except OSError as exc:
            log.warning(
                "tuning cache %s %s; ignoring it (could not set it aside: %s)",
                self.path,
                problem,
                exc.strerror,
            )
            return
        log.warning("tuning cache %s %s; set aside as %s, rebuilding", self.path, problem, aside)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.entries}
            payload = {"format": CACHE_FORMAT, "entries": merged}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as exc:  # a read-only cache dir costs a re-tune next time, nothing more
            log.warning("could not write tuning cache %s: %s", self.path, exc)


def _valid_entry(entry: object) -> bool:
    """{"dense": s, "sparse": s, "choice": "dense" | "sparse"}, times finite and >= 0."""
    if not isinstance(entry, dict) or entry.get("choice") not in CHOICES:
        return False
    times = [entry.get(kind) for kind in CHOICES]
    return all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < float("inf")
        for t in times
    )


def _layer_inputs(layer: ConvLayer, batch: int, device, dtype, channels_last: bool):
    g = layer.geometry
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, g.in_channels, *g.in_hw, generator=gen).to(device, dtype)
    res = None
    if g.residual:
        res = torch.randn(batch, g.out_channels, *g.out_hw, generator=gen).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        res = None if res is None else res.contiguous(memory_format=torch.channels_last)
    return x, res


def make_timer(
    device: torch.device,
    precision: str,
    dtype: torch.dtype,
    *,
    channels_last: bool = False,
    cuda_graphs: bool = True,
    reps: int = 10,
    trials: int = 5,
) -> Timer:
    """The real timer: CUDA events around a graph of `reps` calls, or perf_counter on CPU."""

    def time_cpu(op: ConvOp, layer: ConvLayer, batch: int) -> float:
        x, res = _layer_inputs(layer, batch, device, dtype, channels_last)
        with torch.inference_mode():
            op(x, res)  # first call pays one-time setup
            samples = []
            for _ in range(2):
                start = time.perf_counter()
                op(x, res)
                samples.append(time.perf_counter() - start)
        return min(samples)

    def time_cuda(op: ConvOp, layer: ConvLayer, batch: int) -> float:
        x, res = _layer_inputs(layer, batch, device, dtype, channels_last)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), precision_scope(precision), torch.cuda.stream(stream):
            for _ in range(3):
                op(x, res)
            stream.synchronize()
            replay = _capture(op, x, res, stream) if cuda_graphs else None
            calls = reps if replay is not None else 1
            run = replay if replay is not None else (lambda: op(x, res))
            samples = []
            for _ in range(trials):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                run()
                end.record(stream)
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / calls)
        return statistics.median(samples)

    def _capture(op, x, res, stream):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                for _ in range(reps):
                    op(x, res)
        except RuntimeError as exc:
            log.warning("graph capture failed while tuning (%s); timing eagerly", exc)
            return None
        return graph.replay

    return time_cuda if device.type == "cuda" else time_cpu


def tune(
    layers: Iterable[ConvLayer],
    dense_ops: dict[str, ConvOp],
    sparse_ops: dict[str, ConvOp],
    buckets: Iterable[int],
    timer: Timer,
    cache: TuningCache,
    device: str,
    precision: str,
    on_layer: Callable[[str], None] | None = None,
) -> dict[str, LayerTimings]:
    """For each layer and bucket: the dense and sparse time and the choice, from the cache
    when it has them. Saves the cache once at the end."""
    buckets = sorted(set(buckets))
    result: dict[str, LayerTimings] = {}
    for layer in layers:
        per_bucket: LayerTimings = {}
        for batch in buckets:
            key = tuning_key(device, precision, layer, batch)
            entry = cache.get(key)
            if entry is None:
                dense_s = float(timer(dense_ops[layer.name], layer, batch))
                sparse_s = float(timer(sparse_ops[layer.name], layer, batch))
                entry = {"dense": dense_s, "sparse": sparse_s, "choice": choose(dense_s, sparse_s)}
                cache.put(key, entry)
            per_bucket[batch] = dict(entry)
        result[layer.name] = per_bucket
        if on_layer is not None:
            on_layer(layer.name)
    cache.save()
    return result
