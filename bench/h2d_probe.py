"""What a batch's host-to-device copy costs, by part: the host's enqueueing and the DMA.

    python -m bench.h2d_probe [--rows 8,19,32] [--out h2d.json]

Rows of one 224 px FP32 image (602,112 bytes) in a page-locked shared-memory buffer, as the
engine sees the HTTP workers' arenas. For each batch size: one cudaMemcpyAsync per row (what
`copy_rows` does), one copy of the rows when they are adjacent (coalesced), and the per-row
copies again while another Python thread keeps the GIL busy (the engine process's event loop),
and the engine's own `copy_rows` (driver calls that keep the GIL; adjacent rows coalesced) on
rows in reversed order (no two adjacent) and in order, with the GIL busy.
Host time is the enqueueing (perf_counter around the calls); device time is between CUDA
events recorded before and after on the copy stream. A CUDA machine only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import torch
from cupy.cuda import runtime as cudart

from service.engine.hostcopy import copy_rows

ROW = 3 * 224 * 224 * 4


def _time(stream: torch.cuda.Stream, enqueue, repeats: int) -> dict[str, float]:
    host, device = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            t0 = time.perf_counter()
            start.record(stream)
            enqueue()
            end.record(stream)
            host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        device.append(start.elapsed_time(end))
    return {"host_ms": statistics.median(host), "device_ms": statistics.median(device),
            "device_p90_ms": sorted(device)[int(0.9 * len(device))]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8,19,32")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    slots = max(sizes)
    shm = shared_memory.SharedMemory(create=True, size=slots * ROW)
    host = np.frombuffer(shm.buf, dtype=np.uint8)
    host[:] = 1
    base = int(host.ctypes.data)
    err = torch.cuda.cudart().cudaHostRegister(base, slots * ROW, 0)
    assert int(err) == 0, err
    stage = torch.empty(slots * ROW, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    kind, handle, dst = cudart.memcpyHostToDevice, stream.cuda_stream, stage.data_ptr()

    def per_row(n):
        return lambda: [cudart.memcpyAsync(dst + i * ROW, base + i * ROW, ROW, kind, handle)
                        for i in range(n)]  # fmt: skip

    def coalesced(n):
        return lambda: cudart.memcpyAsync(dst, base, n * ROW, kind, handle)

    results: dict[str, dict] = {}
    for n in sizes:
        per_row(n)()  # warm
        results[f"per_row_{n}"] = _time(stream, per_row(n), args.repeats)
        results[f"coalesced_{n}"] = _time(stream, coalesced(n), args.repeats)
    rows = [host[i * ROW : (i + 1) * ROW].view(np.float32) for i in range(slots)]
    stage_rows = stage.view(torch.float32).view(slots, ROW // 4)

    def engine_path(n, order):
        picked = [rows[i] for i in order(n)]
        return lambda: copy_rows(stage_rows, picked, range(n), stream)

    def reversed_order(n):
        return list(range(n))[::-1]

    def in_order(n):
        return list(range(n))

    for i, row in enumerate(rows):  # check the engine path lands each row where it belongs
        row[:] = i
    for order in (reversed_order, in_order):
        engine_path(slots, order)()
        torch.cuda.synchronize()
        landed = stage_rows[:, ::4096].cpu().numpy()
        assert (landed == np.array(order(slots), dtype=np.float32)[:, None]).all(), order

    stop = threading.Event()

    def busy() -> None:  # pure-Python work: holds the GIL but for the switch interval
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    for n in sizes:
        results[f"per_row_gil_busy_{n}"] = _time(stream, per_row(n), args.repeats)
        results[f"coalesced_gil_busy_{n}"] = _time(stream, coalesced(n), args.repeats)
        results[f"copy_rows_scattered_gil_busy_{n}"] = _time(
            stream, engine_path(n, reversed_order), args.repeats
        )
        results[f"copy_rows_adjacent_gil_busy_{n}"] = _time(
            stream, engine_path(n, in_order), args.repeats
        )
    stop.set()
    thread.join()
    for name, r in results.items():
        print(f"{name:34s} host {r['host_ms']:.3f} ms  device {r['device_ms']:.3f} ms "
              f"(p90 {r['device_p90_ms']:.3f})")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"row_bytes": ROW, "results": results}, f, indent=1)
    torch.cuda.cudart().cudaHostUnregister(base)
    shm.unlink()  # the mapping itself goes with the process: numpy views still hold it


if __name__ == "__main__":
    main()
