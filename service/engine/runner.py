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
from collections.abc import Iterator, Sequence
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
        self._stages: dict[str, torch.Tensor] = {}  # device staging for rows of another dtype
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

    def check_rows(self, rows: Sequence[np.ndarray]) -> None:
        if len(rows) > self.max_batch_size:
            raise BadBatchError(f"batch of {len(rows)} exceeds max_batch_size {self.max_batch_size}")
        for row in rows:
            if not isinstance(row, np.ndarray) or row.dtype not in (np.float32, np.float16):
                kind = getattr(row, "dtype", type(row).__name__)
                raise BadBatchError(f"input must be float32 or float16 rows, got {kind}")
            if tuple(row.shape) != self.input_shape:
                want = "[" + ", ".join(map(str, self.input_shape)) + "]"
                raise BadBatchError(f"each row must be {want}, got {list(row.shape)}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32/float16 [N, *input_shape] -> float32 [N, classes] (probabilities or logits)."""
        self.check(batch)
        return self._run(batch)

    def infer_rows(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """`infer` on separate rows [*input_shape]. Rows in page-locked memory (a registered
        shared-memory arena) go to the device one async copy each, with no staging copy."""
        self.check_rows(rows)
        if not self.cuda:
            return self._run(np.stack(rows) if len(rows) else np.zeros((0, *self.input_shape)))
        return self._run(rows)

    def _run(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        if not self.warmed:
            self.warm()
        n = len(batch)
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
                b = self.bucket_for(n)
                with self.context():
                    self._stage(b, batch)
                    out = self._run_bucket(b)
                    host_out = self._host_out[:n]
                    host_out.copy_(out[:n], non_blocking=True)
                    self.stream.synchronize()
                    result = host_out.numpy().copy()
                    if profile:
                        # After the answer is on the host, on the same static input: the
                        # sampled pass never changes what this batch computes or returns.
                        records = self.profiler.run(lambda: self.forward(self._static_in[b]))[1]
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

    def _stage(self, b: int, batch: Sequence[np.ndarray]) -> None:
        """Copy the batch's rows into bucket b's static input, on the runner's stream."""
        n = len(batch)
        static = self._static_in[b]
        if not isinstance(batch, np.ndarray) and all(_is_pinned(row) for row in batch):
            dtypes = {row.dtype for row in batch}
            only = next(iter(dtypes)) if len(dtypes) == 1 else None
            stage = static
            if only is None or _TORCH_OF[only] != static.dtype:
                # Rows of another dtype (FP16 rows, fp32 model) land in a device buffer of
                # their own dtype and are cast there; mixed batches stage as fp32.
                stage = self._device_stage(only if only is not None else np.float32)
            for i, row in enumerate(batch):
                host = torch.from_numpy(row)
                if host.dtype != stage.dtype:  # mixed batch: cast this row on the host
                    host = host.to(stage.dtype)
                stage[i].copy_(host, non_blocking=True)
            if stage is not static:
                static[:n].copy_(stage[:n])  # the dtype cast happens on the device
            return
        if isinstance(batch, np.ndarray):
            self._host_in_np[:n] = batch  # numpy casts float16 <-> float32 as needed
        else:
            for i, row in enumerate(batch):
                self._host_in_np[i] = row
        static[:n].copy_(self._host_in[:n], non_blocking=True)

    def _device_stage(self, dtype: np.dtype) -> torch.Tensor:
        key = np.dtype(dtype).str
        if key not in self._stages:
            shape = (self.buckets[-1], *self.input_shape)
            torch_dtype = torch.float16 if key == np.dtype(np.float16).str else torch.float32
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

    def _report(self, records: list) -> None:
        for layer, op, seconds in records:
            try:
                self.observer(self.model_name, self.backend, layer, op, seconds)
            except Exception:  # a metrics hiccup must never fail a batch
                log.exception("layer observer failed for %s/%s", self.model_name, layer)
                return


_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def _is_pinned(row: np.ndarray) -> bool:
    # Read-only rows (views of request bytes) are never page-locked; from_numpy would warn.
    return row.flags.writeable and row.flags.c_contiguous and torch.from_numpy(row).is_pinned()
