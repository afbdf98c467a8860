"""Runs one built model (one model x backend): numpy batch in, numpy probabilities out.

On CUDA the runner owns a stream, pinned host buffers and one CUDA graph per batch bucket
(1, 2, 4, ... max_batch_size). A batch is copied into its bucket's static input (the rows past
it keep stale, finite data whose outputs are dropped), the graph is replayed, and the rows that
matter come back through the pinned output buffer: one synchronize per batch and no Python per
layer. One batch in every `profile_every` is sampled for the per-layer metric: it replays its
bucket's timed graph (the same graph with timing events around every layer, captured beside the
plain one), or, where there is none (the CPU, a bucket that could not be captured), runs an
eager pass under the layer profiler after the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from service.engine.assemble import BuiltModel
from service.engine.backends import set_precision_flags
from service.engine.decode import decode_rows, is_encoded
from service.engine.errors import BadBatchError
from service.engine.hostcopy import DeviceMirror, PinnedRanges, copy_rows
from service.engine.profiler import (
    CapturedLayers,
    LayerProfiler,
    capture_layer_events,
    graph_events_supported,
)
from service.engine.protocol import LayerObserver, Preprocessing, StageObserver

log = logging.getLogger(__name__)

SLOW_PASS_S = 0.05  # a sampled per-layer pass this long on the host is logged as slow
WARM_CALLS = 3  # cuDNN autotuning, cuBLAS/cuSPARSE handles and kernel compiles happen here


def batch_buckets(max_batch_size: int, step: int = 0) -> tuple[int, ...]:
    """The batch sizes that get a CUDA graph: powers of two below max_batch_size, then
    max_batch_size itself; with `step`, powers of two up to `step` and then every `step` rows
    (1, 2, 4, 8, 16, 24, 32 for step 8), so that a partial batch pays for at most `step - 1`
    padded rows instead of up to half the largest batch."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if step < 0:
        raise ValueError(f"the bucket step must be >= 0, got {step}")
    buckets, size = [], 1
    while size < max_batch_size and (step == 0 or size < step):
        buckets.append(size)
        size *= 2
    if step:
        size = step
        while size < max_batch_size:
            buckets.append(size)
            size += step
    return tuple(sorted({*buckets, max_batch_size}))


class Runner:
    def __init__(
        self,
        built: BuiltModel,
        *,
        model_name: str,
        input_shape: tuple[int, int, int],
        max_batch_size: int,
        buckets: tuple[int, ...] | None = None,
        cuda_graphs: bool = True,
        profile_every: int = 0,
        observer: LayerObserver | None = None,
        probabilities: bool = True,
        preprocessing: Preprocessing | None = None,
        stage_observer: StageObserver | None = None,
    ) -> None:
        self.stage_observer = stage_observer
        # Host ranges the engine page-locked (its arenas), shared by its runners.
        self.pinned: PinnedRanges | None = None
        self.mirror: DeviceMirror | None = None  # device copies of those rows, when pushed
        self.built = built
        # Set when rows may be encoded JPEG photos to decode here (ESCORT_IMAGE_DECODE=engine).
        self.preprocessing = preprocessing
        self.module = built.module
        self.model_name = model_name
        self.backend = built.backend
        self.device = built.device
        self.input_shape = tuple(input_shape)
        self.max_batch_size = max_batch_size
        self.buckets = tuple(sorted(set(buckets or batch_buckets(max_batch_size))))
        if self.buckets[-1] < max_batch_size:
            raise ValueError(f"buckets {self.buckets} do not reach max_batch_size")
        self.cuda = self.device.type == "cuda"
        self.use_graphs = cuda_graphs and self.cuda
        self.probabilities = probabilities
        self.profile_every = max(0, int(profile_every))
        self.observer = observer
        self.profiler = LayerProfiler(self.module, self.device) if observer else None
        self.num_classes: int | None = None
        self.batches = 0
        self.warmed = False
        self._lock = threading.Lock()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_out: dict[int, torch.Tensor] = {}
        # Per bucket, the timed graph that sampled batches replay: graph, output, its events.
        self._timed: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, CapturedLayers]] = {}
        self._timed_unread = False  # a timed replay whose events are not read yet
        self._static_in: dict[int, torch.Tensor] = {}
        # Device staging per pipeline slot and row dtype; what a slot's last batch left there
        # is read (by its copy into the static input) before `_slot_done[slot]` fires.
        self._stages: dict[tuple[int, str], torch.Tensor] = {}
        self._slot_done: list[torch.cuda.Event | None] = [None for _ in _SLOTS]
        self._next_slot = 0
        self._profile_marks: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._slow_pass_said = -1e9  # when a slow sampled pass was last logged (monotonic)
        self.eager_buckets: set[int] = set()
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            # Rows go to the device on a stream of their own, so that a batch's copies can run
            # while the batch before it replays (launch/collect, two batches in flight).
            self.copy_stream = torch.cuda.Stream(self.device)
            top = self.buckets[-1]
            shape = (top, *self.input_shape)
            self._host_in = [torch.zeros(shape, dtype=built.dtype).pin_memory() for _ in _SLOTS]
            self._host_in_np = [buffer.numpy() for buffer in self._host_in]
            for b in self.buckets:
                self._static_in[b] = torch.zeros((b, *self.input_shape), dtype=built.dtype)
                self._static_in[b] = self._static_in[b].to(self.device)

    # ------------------------------------------------------------ lifecycle

    @contextmanager
    def context(self) -> Iterator[None]:
        """Device, own stream, inference mode and precision flags: where all work runs."""
        with ExitStack() as stack:
            if self.cuda:
                stack.enter_context(torch.cuda.device(self.device))
                stack.enter_context(torch.cuda.stream(self.stream))
            stack.enter_context(torch.inference_mode())
            set_precision_flags(self.built.precision)
            yield

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.built.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.module(x).float()
        return torch.softmax(y, dim=1) if self.probabilities else y

    def warm(self) -> None:
        """Run (and on CUDA capture) every bucket once, so no request pays for setup."""
        with self._lock:
            if not self.cuda:
                with self.context():
                    out = self.forward(torch.zeros((1, *self.input_shape)))
                self.num_classes = int(out.shape[1])
                self.warmed = True
                return
            torch.cuda.synchronize(self.device)  # weights were written on the default stream
            pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
            # Largest first: smaller buckets' graphs then fit in blocks the larger one freed.
            for b in sorted(self.buckets, reverse=True):
                x = self._static_in[b]
                with self.context():
                    for _ in range(WARM_CALLS):
                        out = self.forward(x)
                    self.stream.synchronize()
                    if self.use_graphs:
                        out = self._capture(b, x, pool)
                        if b in self._graphs and self._samples_layers():
                            self._capture_timed(b, x, pool)
                self.num_classes = int(out.shape[1])
            self.stream.synchronize()
            top = self.buckets[-1]
            self._host_out = [torch.zeros((top, self.num_classes)).pin_memory() for _ in _SLOTS]
            self.warmed = True

    def warm_this_thread(self) -> None:
        """Run every bucket eagerly once in the calling thread (the batcher's, which runs
        the sampled per-layer pass). PyTorch keeps cuDNN's tuned plans per host thread, so
        without this the first sampled pass of each bucket there tunes every dense conv again
        (hundreds of milliseconds, with the device held and the batches behind it waiting)."""
        if not self.cuda or not self._samples_layers():
            return
        if not self.warmed:
            self.warm()
        if set(self._timed) >= set(self.buckets):
            return  # every bucket samples through its timed graph: no eager pass here
        with self._lock, self.context():
            for b in self.buckets:
                self.forward(self._static_in[b])
            self.stream.synchronize()

    def _capture(self, b: int, x: torch.Tensor, pool) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(
                graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"
            ):
                out = self.forward(x)
        except RuntimeError as exc:
            # Some library calls cannot be captured (they sync or allocate on the host);
            # that bucket then runs eagerly, which is slower but still correct.
            log.warning(
                "%s/%s: bucket %d runs eagerly, capture failed: %s",
                self.model_name,
                self.backend,
                b,
                exc,
            )
            torch.cuda.synchronize(self.device)
            self.eager_buckets.add(b)
            return self.forward(x)
        self._graphs[b], self._graph_out[b] = graph, out
        return out

    def _samples_layers(self) -> bool:
        return self.profiler is not None and self.profile_every > 0

    def _capture_timed(self, b: int, x: torch.Tensor, pool) -> None:
        """Bucket b's timed graph: the plain graph's work with a timing event before and after
        every layer, recorded as nodes of the graph (profiler.capture_layer_events). Without
        it, that bucket's sampled batches take the eager pass."""
        if not graph_events_supported():
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with (
                capture_layer_events(self.module) as layers,
                torch.cuda.graph(
                    graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"
                ),
            ):
                out = self.forward(x)
        except RuntimeError as exc:
            log.warning(
                "%s/%s: bucket %d samples its layers eagerly, its timed graph failed: %s",
                self.model_name, self.backend, b, exc,
            )  # fmt: skip
            torch.cuda.synchronize(self.device)
            return
        if layers.marks:
            self._timed[b] = (graph, out, layers)

    @property
    def timed_buckets(self) -> tuple[int, ...]:
        """Buckets whose sampled batches replay a timed graph."""
        return tuple(sorted(self._timed))

    @property
    def graph_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def close(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._graph_out.clear()
            self._timed.clear()
            self.warmed = False

    # ------------------------------------------------------------ running

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise BadBatchError(f"batch of {n} exceeds max_batch_size {self.max_batch_size}")

    def check(self, batch: np.ndarray) -> None:
        if not isinstance(batch, np.ndarray) or batch.dtype not in (np.float32, np.float16):
            kind = getattr(batch, "dtype", type(batch).__name__)
            raise BadBatchError(f"input must be a float32 or float16 array, got {kind}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            want = "[N, " + ", ".join(map(str, self.input_shape)) + "]"
            raise BadBatchError(f"input shape must be {want}, got {list(batch.shape)}")
        if batch.shape[0] > self.max_batch_size:
            raise BadBatchError(
                f"batch of {batch.shape[0]} exceeds max_batch_size {self.max_batch_size}"
            )

    def check_rows(self, rows: Sequence[np.ndarray]) -> None:
        if len(rows) > self.max_batch_size:
            raise BadBatchError(
                f"batch of {len(rows)} exceeds max_batch_size {self.max_batch_size}"
            )
        for row in rows:
            if self.preprocessing is not None and isinstance(row, np.ndarray) and is_encoded(row):
                continue  # an encoded photo, decoded on the device (service/engine/decode.py)
            if not isinstance(row, np.ndarray) or row.dtype not in (np.float32, np.float16):
                kind = getattr(row, "dtype", type(row).__name__)
                raise BadBatchError(f"input must be float32 or float16 rows, got {kind}")
            if tuple(row.shape) != self.input_shape:
                want = "[" + ", ".join(map(str, self.input_shape)) + "]"
                raise BadBatchError(f"each row must be {want}, got {list(row.shape)}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32/float16 [N, *input_shape] -> float32 [N, classes] (probabilities or logits)."""
        self.check(batch)
        return self.collect(self._launch(batch))

    def infer_rows(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """`infer` on separate rows [*input_shape]. Rows in page-locked memory (a registered
        shared-memory arena) go to the device one async copy each, with no staging copy."""
        return self.collect(self.launch_rows(rows))

    def launch_rows(self, rows: Sequence[np.ndarray]) -> Launched:
        """Queue a batch on the device and return at once (on CUDA): its rows are copied on
        the copy stream, into a staging buffer of their own, while the batch launched before
        it may still replay; `collect` waits for the answer. Two batches may be in flight."""
        self.check_rows(rows)
        return self._launch(rows)

    def collect(self, launched: Launched) -> np.ndarray:
        """The probabilities of a launched batch, once the device is done with it."""
        if launched.result is None:
            assert launched.done is not None and launched.host is not None
            launched.done.synchronize()
            launched.result = launched.host.numpy().copy()
            # A photo that did not decode answers NaN: the service turns it into a 400.
            launched.result[launched.failed] = np.nan
            self._report_stages(launched.marks)
            if launched.layers is not None:
                self._report_timed(launched.layers, launched.bucket)
        return launched.result

    def _launch(self, batch: Sequence[np.ndarray]) -> Launched:
        if not self.warmed:
            self.warm()
        n = len(batch)
        if n == 0:
            return Launched(result=np.zeros((0, self.num_classes or 0), dtype=np.float32))
        with self._lock:
            self.batches += 1
            profile = (
                self.profiler is not None
                and self.profile_every > 0
                and self.batches % self.profile_every == 0
            )
            records, ran_at = [], len(batch)
            if self.cuda:
                launched, records = self._launch_cuda(batch, profile)
                ran_at = launched.bucket
            else:
                x, failed = self._cpu_batch(batch)
                with self.context():
                    if profile:
                        out, records = self.profiler.run(lambda: self.forward(x))
                    else:
                        out = self.forward(x)
                result = out.numpy().copy()
                result[failed] = np.nan
                launched = Launched(result=result)
        self._report(records, ran_at)
        return launched

    def _launch_cuda(self, batch: Sequence[np.ndarray], profile: bool) -> tuple[Launched, list]:
        n = len(batch)
        b = self.bucket_for(n)
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(_SLOTS)
        previous = self._slot_done[slot]
        if previous is not None:
            previous.synchronize()  # the slot's last batch is done with its buffers
        records: list = []
        timed = self.stage_observer is not None
        # start, staged (copy stream), begin (compute stream may run it), replayed, done. The
        # thread that waits on "done" sleeps until the batch ends (a blocking-sync event)
        # instead of spinning on a core for the whole replay (CUDA's default with fewer
        # contexts than cores): at 70% of saturation the device is busy nearly all the time,
        # so a spinning collector kept one host core busy that the HTTP workers need.
        marks = [torch.cuda.Event(enable_timing=timed) for _ in range(4)]
        marks.append(torch.cuda.Event(enable_timing=timed, blocking=True))
        with self.context():
            with torch.cuda.stream(self.copy_stream):
                marks[0].record(self.copy_stream)
                stage, failed = self._stage(slot, batch)
                marks[1].record(self.copy_stream)
            self.stream.wait_event(marks[1])
            marks[2].record(self.stream)
            static = self._static_in[b]
            static[:n].copy_(stage[:n])  # on the device; casts FP16 rows for an fp32 model
            sampled = self._timed.get(b) if profile else None
            if sampled is not None and self._timed_unread:
                sampled, profile = None, False  # the last sample is not read yet: skip this one
            if sampled is not None:
                sampled[0].replay()  # the batch itself, its layers timed on the way
                out = sampled[1]
                self._timed_unread = True
            else:
                out = self._run_bucket(b)
            marks[3].record(self.stream)
            host = self._host_out[slot][:n]
            host.copy_(out[:n], non_blocking=True)
            done = marks[4]
            done.record(self.stream)
            self._slot_done[slot] = done
            if profile and sampled is None:
                # After the batch, on its own static input, on the same stream: the sampled
                # pass never changes what the batch computes or returns. Its own device time
                # (the "profile" stage) is what it costs the batches queued behind it.
                records = self.profiler.run(lambda: self.forward(static))[1]
                self._note_slow_pass(b)
                if timed:
                    profiled = torch.cuda.Event(enable_timing=True)
                    profiled.record(self.stream)
                    self._profile_marks = (done, profiled)
        launched = Launched(
            done=done,
            host=host,
            failed=failed,
            marks=marks if timed else [],
            layers=sampled[2] if sampled is not None else None,
            bucket=b,
        )
        return launched, records

    def _stage(self, slot: int, batch: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        """Copy the batch's rows to the device (on the current stream, the copy stream), and
        decode its encoded photos there; returns the device buffer that holds the batch and the
        indices of photos that did not decode."""
        n = len(batch)
        if isinstance(batch, np.ndarray):
            host_np = self._host_in_np[slot]
            host_np[:n] = batch  # numpy casts float16 <-> float32 as needed
            stage = self._device_stage(slot, host_np.dtype)
            stage[:n].copy_(self._host_in[slot][:n], non_blocking=True)
            return stage, []
        encoded = [i for i, row in enumerate(batch) if is_encoded(row)]
        floats = [i for i in range(n) if not is_encoded(batch[i])]
        if floats and all(self._pinned_row(batch[i]) for i in floats):
            dtypes = {batch[i].dtype for i in floats}
            only = next(iter(dtypes)) if len(dtypes) == 1 else np.dtype(np.float32)
            stage = self._device_stage(slot, only)
            same = [i for i in floats if batch[i].dtype == only]
            copy_rows(stage, batch, same, self.copy_stream, self.mirror)
            for i in floats:
                if batch[i].dtype != only:  # a mixed batch: cast this row on the host
                    stage[i].copy_(torch.from_numpy(batch[i]).to(stage.dtype))
        elif floats:
            host_np = self._host_in_np[slot]
            for i in floats:
                host_np[i] = batch[i]
            stage = self._device_stage(slot, host_np.dtype)
            stage[:n].copy_(self._host_in[slot][:n], non_blocking=True)
        else:
            stage = self._device_stage(slot, np.dtype(np.float32))
        return stage, self._decode_into(stage, batch, encoded)

    def _pinned_row(self, row: np.ndarray) -> bool:
        """Page-locked: in an arena the engine registered, or (a test's buffers) by torch."""
        return (self.pinned is not None and self.pinned.holds(row)) or _torch_pinned(row)

    def _decode_into(
        self, stage: torch.Tensor, batch: Sequence[np.ndarray], encoded: list[int]
    ) -> list[int]:
        if not encoded:
            return []
        assert self.preprocessing is not None
        prepared, bad = decode_rows([batch[i] for i in encoded], self.preprocessing, self.device)
        for i, image in zip(encoded, prepared, strict=True):
            if image is None:
                stage[i].zero_()  # finite filler; the row's answer is dropped
            else:
                stage[i].copy_(image)
        return [encoded[j] for j in bad]

    def _cpu_batch(self, batch: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        if isinstance(batch, np.ndarray):
            # A copy: callers may hand read-only views of request bodies.
            return torch.from_numpy(np.array(batch, dtype=np.float32)), []
        x = torch.zeros((len(batch), *self.input_shape))
        encoded = []
        for i, row in enumerate(batch):
            if is_encoded(row):
                encoded.append(i)
            else:
                x[i] = torch.from_numpy(np.array(row, dtype=np.float32))
        return x, self._decode_into(x, batch, encoded)

    def _device_stage(self, slot: int, dtype: np.dtype) -> torch.Tensor:
        key = (slot, np.dtype(dtype).str)
        if key not in self._stages:
            shape = (self.buckets[-1], *self.input_shape)
            torch_dtype = _TORCH_OF[np.dtype(dtype)]
            self._stages[key] = torch.empty(shape, dtype=torch_dtype, device=self.device)
        return self._stages[key]

    def run_bucket(self, b: int) -> torch.Tensor:
        """Compute bucket b from its static input; call inside `context()`. For benches."""
        return self._run_bucket(b)

    def static_input(self, b: int) -> torch.Tensor:
        return self._static_in[b]

    def _run_bucket(self, b: int) -> torch.Tensor:
        if b in self._graphs:
            self._graphs[b].replay()
            return self._graph_out[b]
        return self.forward(self._static_in[b])

    def _note_slow_pass(self, b: int) -> None:
        """Say so (at most once a minute) when a sampled pass held the device far longer than
        its layers need: the batches queued behind it waited that long."""
        stats = self.profiler.last_pass if self.profiler is not None else None
        if stats is None or stats.host_s < SLOW_PASS_S:
            return
        now = time.monotonic()
        if now - self._slow_pass_said < 60.0:
            return
        self._slow_pass_said = now
        log.warning(
            "%s/%s: a sampled per-layer pass at batch %d took %.0f ms (%.0f ms of waits, "
            "%.1f ms of layers, %d of %d layers dropped); batches behind it waited",
            self.model_name, self.backend, b, stats.host_s * 1e3, stats.sleep_s * 1e3,
            stats.device_s * 1e3, len(stats.dropped), stats.layers,
        )  # fmt: skip

    def _report_stages(self, marks: list) -> None:
        if self.stage_observer is None:
            return
        pending = self._profile_marks
        if pending is not None and pending[1].query():  # a sampled pass that has finished
            self._profile_marks = None
            try:
                seconds = pending[0].elapsed_time(pending[1]) / 1e3
                self.stage_observer(self.model_name, self.backend, "profile", seconds)
            except Exception:  # a metrics hiccup must never fail a batch
                log.exception("stage observer failed for %s/%s", self.model_name, self.backend)
        if not marks:
            return
        start, staged, begin, replayed, done = marks
        try:
            stages = (
                ("h2d", start.elapsed_time(staged)),
                ("replay", begin.elapsed_time(replayed)),
                ("d2h", replayed.elapsed_time(done)),
            )
            for stage, ms in stages:
                self.stage_observer(self.model_name, self.backend, stage, ms / 1e3)
        except Exception:  # a metrics hiccup must never fail a batch
            log.exception("stage observer failed for %s/%s", self.model_name, self.backend)

    def _report_timed(self, layers: CapturedLayers, batch: int) -> None:
        """The layer times of a sampled batch's timed replay, once the batch is back."""
        try:
            records = layers.records()
        except Exception:  # an unreadable event must never fail the batch
            log.exception("timed layers unreadable for %s/%s", self.model_name, self.backend)
            records = []
        finally:
            self._timed_unread = False
        self._report(records, batch)

    def _report(self, records: list, batch: int) -> None:
        for layer, op, seconds in records:
            try:
                self.observer(self.model_name, self.backend, layer, op, seconds, batch)
            except Exception:  # a metrics hiccup must never fail a batch
                log.exception("layer observer failed for %s/%s", self.model_name, layer)
                return


_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}
_SLOTS = (0, 1)  # batches that may be in flight at once: one replaying, one being staged


@dataclass
class Launched:
    """A batch on its way: the event its answer waits for and where the answer lands (CUDA),
    or the answer itself (CPU, computed at launch)."""

    done: torch.cuda.Event | None = None
    host: torch.Tensor | None = None
    result: np.ndarray | None = None
    failed: list[int] = field(default_factory=list)  # photos that did not decode
    marks: list = field(default_factory=list)  # timing events of the batch's stages, or none
    layers: CapturedLayers | None = None  # a sampled batch's timed layers, read at collect
    bucket: int = 0  # the batch size its graph ran at (CUDA)


def _torch_pinned(row: np.ndarray) -> bool:
    # Read-only rows (views of request bytes) are never page-locked; from_numpy would warn.
    return row.flags.writeable and row.flags.c_contiguous and torch.from_numpy(row).is_pinned()
