"""Runs one built model (one model x backend): numpy batch in, numpy probabilities out.

On CUDA the runner owns a stream, pinned host buffers and one CUDA graph per batch bucket
(1, 2, 4, ... max_batch_size). A batch is copied into its bucket's static input (the rows past
it keep stale, finite data whose outputs are dropped), the graph is replayed, and the rows that
matter come back through the pinned output buffer: one synchronize per batch and no Python per
layer. One batch in every `profile_every` runs eagerly under the layer profiler instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from service.engine.assemble import BuiltModel
from service.engine.backends import set_precision_flags
from service.engine.errors import BadBatchError
from service.engine.profiler import LayerProfiler
from service.engine.protocol import LayerObserver

log = logging.getLogger(__name__)

WARM_CALLS = 3  # cuDNN autotuning, cuBLAS/cuSPARSE handles and kernel compiles happen here


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, then max_batch_size itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


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
    ) -> None:
        self.built = built
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
        self._static_in: dict[int, torch.Tensor] = {}
        self.eager_buckets: set[int] = set()
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            top = self.buckets[-1]
            shape = (top, *self.input_shape)
            self._host_in = torch.zeros(shape, dtype=built.dtype).pin_memory()
            self._host_in_np = self._host_in.numpy()
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
                self.num_classes = int(out.shape[1])
            self.stream.synchronize()
            top = self.buckets[-1]
            self._host_out = torch.zeros((top, self.num_classes)).pin_memory()
            self.warmed = True

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

    @property
    def graph_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def close(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._graph_out.clear()
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

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32/float16 [N, *input_shape] -> float32 [N, classes] (probabilities or logits)."""
        self.check(batch)
        if not self.warmed:
            self.warm()
        n = int(batch.shape[0])
        if n == 0:
            return np.zeros((0, self.num_classes or 0), dtype=np.float32)
        with self._lock:
            self.batches += 1
            profile = (
                self.profiler is not None
                and self.profile_every > 0
                and self.batches % self.profile_every == 0
            )
            records = []
            if self.cuda:
                self._host_in_np[:n] = batch  # numpy casts float16 <-> float32 as needed
                b = self.bucket_for(n)
                with self.context():
                    self._static_in[b][:n].copy_(self._host_in[:n], non_blocking=True)
                    out, records = self._run_bucket(b, profile)
                    host_out = self._host_out[:n]
                    host_out.copy_(out[:n], non_blocking=True)
                    self.stream.synchronize()
                result = host_out.numpy().copy()
            else:
                # A copy: callers may hand read-only views of request bodies.
                x = torch.from_numpy(np.array(batch, dtype=np.float32))
                with self.context():
                    if profile:
                        out, records = self.profiler.run(lambda: self.forward(x))
                    else:
                        out = self.forward(x)
                result = out.numpy().copy()
        self._report(records)
        return result

    def run_bucket(self, b: int) -> torch.Tensor:
        """Compute bucket b from its static input; call inside `context()`. For benches."""
        return self._run_bucket(b, profile=False)[0]

    def static_input(self, b: int) -> torch.Tensor:
        return self._static_in[b]

    def _run_bucket(self, b: int, profile: bool) -> tuple[torch.Tensor, list]:
        x = self._static_in[b]
        if profile:
            return self.profiler.run(lambda: self.forward(x))
        if b in self._graphs:
            self._graphs[b].replay()
            return self._graph_out[b], []
        return self.forward(x), []

    def _report(self, records: list) -> None:
        for layer, op, seconds in records:
            try:
                self.observer(self.model_name, self.backend, layer, op, seconds)
            except Exception:  # a metrics hiccup must never fail a batch
                log.exception("layer observer failed for %s/%s", self.model_name, layer)
                return
