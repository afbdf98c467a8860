"""Where the engine's JPEG decode spends its time (ESCORT_IMAGE_DECODE=engine), on one device.

    python -m bench.decode_bench --device cuda --batch 32 --out DIR

Times, per batch of the load test's photos (every JPEG of tests/data at 1280, 640, 320 and
160 px on the long side, taken in turn): nvJPEG's batched decode alone; the whole
`decode_rows` (decode, then one resize, crop and normalization per photo size); the same with
each photo prepared alone and its constants made again (the code before 2026-12-01's third
session); and Pillow in one process (the worker path, per image). Median of --reps runs after
warm-up, with the device synchronized around each. Writes decode.json and decode.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from loadtest.images import make_variants
from service.engine import decode
from service.engine.protocol import Preprocessing
from service.preprocess import preprocess_image

SPEC = Preprocessing(resize=256, crop=224, mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))


def _per_photo(rows, device):
    """The earlier engine path: every photo resized alone, mean and std copied per photo."""
    out = []
    for image in decode._decode_all(rows, device):
        decode._CONSTANTS.clear()
        out.append(decode.prepare(image, SPEC))
    return out


def _time(fn, device, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="bench-decode")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    photos = [v for v in make_variants() if v.content_type == "image/jpeg"]
    rows = [np.frombuffer(photos[i % len(photos)].data, np.uint8).copy() for i in range(args.batch)]
    blobs = [photos[i % len(photos)].data for i in range(args.batch)]
    cases = {
        "nvjpeg decode only": lambda: decode._decode_all(rows, device),
        "decode_rows (grouped by size)": lambda: decode.decode_rows(rows, SPEC, device),
        "decode + per-photo prepare (before)": lambda: _per_photo(rows, device),
        "Pillow, one process": lambda: [preprocess_image(b, SPEC, 50_000_000) for b in blobs],
    }
    results = {}
    for name, fn in cases.items():
        seconds = _time(fn, device if "Pillow" not in name else torch.device("cpu"), args.reps)
        results[name] = {"ms_per_batch": seconds * 1e3, "images_per_s": args.batch / seconds}
        print(f"{name}: {seconds * 1e3:.2f} ms per batch of {args.batch}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": name, "batch": args.batch, "photos": [p.name for p in photos],
              "results": results}  # fmt: skip
    (out / "decode.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Engine JPEG decode, {name}, batch {args.batch}", "",
             "| path | ms per batch | img/s |", "|---|---|---|"]  # fmt: skip
    for case, r in results.items():
        lines.append(f"| {case} | {r['ms_per_batch']:.2f} | {r['images_per_s']:,.0f} |")
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
