"""What the batcher's policy alone does to latency: a simulation with measured batch times.

    python -m bench.batcher_sim [--share 0.6,0.7] [--pause-ms 16] [--handoff-ms 5]

Poisson arrivals of single images at a share of the full-batch rate; batch times
t(b) = fixed + per_row × bucket(b) with buckets every 4 rows (ESCORT_BATCH_BUCKET_STEP), the
fits of run 4/5 on the H200 (docs/service.md); the policy of `service.batching`: with a batch
on the device, the next takes what is queued LOOKAHEAD before that batch ends and starts when
it ends; with the device idle, a batch waits for 32 rows or the delay from its oldest. Every
request also pays a constant hand-off (the HTTP worker's stages and the pipe), and every
`--every` batches the device pauses `--pause-ms` (an eager sampled per-layer pass: the CPU, or a
bucket without a timed graph; on a GPU a sampled batch replays its timed graph and adds no
pause, and run 6 showed an eager pass cost its host time, not just this). Prints p50 and
p99 of the latency, the mean batch and how busy the device was. What it leaves out (jitter in
the hand-offs, host pauses) is what a measured p99 above the simulated one is made of.
"""

from __future__ import annotations

import argparse

import numpy as np

from service.batching import LOOKAHEAD_S
from service.engine.runner import batch_buckets

# Measured on the H200 (run 4/5): the step's batch time against its mean batch, and the
# offline batch-32 rate.
FITS = {"sparse": (1.6, 0.234, 3552.0), "dense": (3.2, 0.23, 3048.0)}


def simulate(
    rate_per_ms: float,
    fixed_ms: float,
    per_row_ms: float,
    *,
    max_batch: int = 32,
    step: int = 4,
    delay_ms: float = 5.0,
    handoff_ms: float = 5.0,
    pause_ms: float = 0.0,
    every: int = 1000,
    requests: int = 200_000,
    seed: int = 0,
) -> dict[str, float]:
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate_per_ms, requests))
    buckets = np.array(batch_buckets(max_batch, step))
    lookahead_ms = LOOKAHEAD_S * 1000.0
    latency = np.empty(requests)
    i, free, batches, busy = 0, 0.0, 0, 0.0
    while i < requests:
        first = arrivals[i]
        last = arrivals[min(i + max_batch - 1, requests - 1)]
        if first >= free:  # the device is idle: fill up, or wait the delay from the oldest
            take = start = min(first + delay_ms, last)
        else:  # launched just before the batch on the device ends, started when it does
            take, start = max(free - lookahead_ms, first), free
        j = i + int(np.searchsorted(arrivals[i : i + max_batch], take, side="right"))
        size = j - i
        duration = fixed_ms + per_row_ms * buckets[np.searchsorted(buckets, size)]
        latency[i:j] = start + duration - arrivals[i:j] + handoff_ms
        batches, busy, free = batches + 1, busy + duration, start + duration
        if pause_ms and batches % every == 0:
            free += pause_ms
            busy += pause_ms
        i = j
    p50, p99 = np.percentile(latency, [50, 99])
    span = arrivals[-1] - arrivals[0]
    return {"p50_ms": float(p50), "p99_ms": float(p99), "mean_batch": requests / batches,
            "busy": busy / span}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", default="0.6,0.7", help="shares of the full-batch rate")
    parser.add_argument("--pause-ms", type=float, default=16.0)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--handoff-ms", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    print("| backend | share | pause ms | p50 ms | p99 ms | bound ms | mean batch | busy |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, (fixed, per_row, full_rate) in FITS.items():
        bound = 2 * (5.0 + fixed + per_row * 32)
        for share in (float(s) for s in args.share.split(",")):
            for pause in (0.0, args.pause_ms):
                r = simulate(share * full_rate / 1000.0, fixed, per_row, pause_ms=pause,
                             every=args.every, handoff_ms=args.handoff_ms,
                             requests=args.requests)  # fmt: skip
                print(f"| {backend} | {share:.0%} | {pause:g} | {r['p50_ms']:.1f} | "
                      f"{r['p99_ms']:.1f} | {bound:.1f} | {r['mean_batch']:.1f} | "
                      f"{r['busy']:.0%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
