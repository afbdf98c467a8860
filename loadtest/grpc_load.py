"""A closed-loop load generator for KServe V2 over gRPC (wrk speaks only HTTP/1.1).

    python -m loadtest.grpc_load --target 127.0.0.1:8001 --model resnet50-uniform90 \\
        --users 64 --duration 15 --processes 4 [--backend sparse] [--out result.json]
    python -m loadtest.grpc_load report FOLDER     # grpc_vs_rest.md from a folder of runs

`--users` callers, spread over `--processes` processes, each send one `ModelInferRequest` (a
random FP32 image in `raw_input_contents`, the model's shape read from its metadata) and wait for
its answer before the next, for `--duration` seconds after `--settle` unmeasured ones. The
request is serialized once and sent as bytes, so the generator spends its CPU on gRPC, not on
protobuf. It prints (and writes with `--out`) requests, errors by status, img/s, p50 / p95 / p99
and the CPU its processes used, so that a report can show it was not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(model: str, shape: tuple[int, ...], backend: str | None) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(shape))
    del tensor
    if backend:
        request.parameters["backend"].string_param = backend
    rows = np.random.default_rng(0).standard_normal(shape).astype("<f4")
    request.raw_input_contents.append(rows.tobytes())
    return request.SerializeToString()


def model_shape(target: str, model: str) -> tuple[int, ...]:
    import tritonclient.grpc as triton_grpc

    with triton_grpc.InferenceServerClient(target) as client:
        metadata = client.get_model_metadata(model)
    dims = next(list(t.shape) for t in metadata.inputs if t.name == "input")
    return (1, *dims[1:])


async def _callers(target: str, body: bytes, users: int, settle_s: float, duration_s: float):
    import grpc

    latencies: list[float] = []
    errors: dict[str, int] = {}
    # One channel (an HTTP/2 connection of its own) per caller, as wrk keeps one connection
    # per user: the server's workers each take a share of the connections, and a connection's
    # streams all go to the one worker that accepted it (grpc-r1 used 8 per process: 32
    # connections for 128 callers, hashed unevenly over 12 workers). A local subchannel pool
    # per channel keeps grpc from sharing one connection between channels to one target.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(users)
    ]
    calls = [
        channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        for channel in channels
    ]
    start = time.monotonic()
    measure_from, stop_at = start + settle_s, start + settle_s + duration_s

    async def caller(index: int) -> None:
        call = calls[index % len(calls)]
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                return
            try:
                await call(body, timeout=30)
                ok = True
            except grpc.aio.AioRpcError as exc:
                ok = False
                if sent >= measure_from:
                    name = exc.code().name
                    errors[name] = errors.get(name, 0) + 1
            if ok and sent >= measure_from:
                latencies.append(time.monotonic() - sent)

    await asyncio.gather(*(caller(i) for i in range(users)))
    for channel in channels:
        await channel.close()
    return latencies, errors


def _process(target: str, body: bytes, users: int, settle_s: float, duration_s: float, out):
    latencies, errors = asyncio.run(_callers(target, body, users, settle_s, duration_s))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.send((latencies, errors, usage.ru_utime + usage.ru_stime))
    out.close()


def run(
    target: str,
    model: str,
    users: int,
    duration_s: float,
    processes: int = 4,
    settle_s: float = 2.0,
    backend: str | None = None,
) -> dict[str, Any]:
    body = request_bytes(model, model_shape(target, model), backend)
    processes = max(1, min(processes, users))
    share = [users // processes + (1 if i < users % processes else 0) for i in range(processes)]
    ctx = mp.get_context("spawn")
    pipes, children = [], []
    for count in share:
        mine, theirs = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=_process, args=(target, body, count, settle_s, duration_s, theirs)
        )
        child.start()
        theirs.close()
        pipes.append(mine)
        children.append(child)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    cpu_s = 0.0
    for pipe in pipes:
        got, failed, used = pipe.recv()
        latencies += got
        for name, count in failed.items():
            errors[name] = errors.get(name, 0) + count
        cpu_s += used
    for child in children:
        child.join(30)
    ms = np.asarray(latencies) * 1e3
    ok = len(latencies)

    def pct(q: float) -> float | None:
        return float(np.percentile(ms, q)) if ok else None

    return {
        "protocol": "grpc", "target": target, "model": model, "backend": backend,
        "users": users, "processes": processes, "duration_s": duration_s, "ok": ok,
        "errors": errors, "images_per_s": ok / duration_s,
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99)},
        "generator_cores": cpu_s / (duration_s + settle_s),
    }  # fmt: skip


def compare_markdown(folder: Path) -> str:
    """gRPC beside REST from one folder: `grpc-<users>.json` (this module), `grpc-ceiling.json`
    (the same against the null engine) and `rest/report.json` (loadtest.run with wrk)."""
    rows = []
    for path in sorted(folder.glob("grpc-[0-9]*.json"), key=lambda p: int(p.stem.split("-")[1])):
        got = json.loads(path.read_text())
        rows.append(("gRPC", got["users"], got["images_per_s"], got["latency_ms"], got["errors"]))
    rest_path = folder / "rest" / "report.json"
    rest = json.loads(rest_path.read_text()) if rest_path.exists() else {"steps": []}
    for step in rest["steps"]:
        rows.append(("REST (V2 binary)", step["users"], step["images_per_s"], step["latency_ms"],
                     step["errors"]))  # fmt: skip
    rows.sort(key=lambda row: (row[1], row[0]))
    lines = ["# gRPC beside REST", "",
             "One server, one FP32 image per request in raw bytes, closed loop; "
             "gRPC by `loadtest.grpc_load`, REST by `loadtest.run` with wrk.", "",
             "| users | protocol | img/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]  # fmt: skip
    for protocol, users, rate, lat, errors in rows:
        lines.append(f"| {users} | {protocol} | {rate:,.0f} | {lat['p50'] or 0:.1f} | "
                     f"{lat['p99'] or 0:.1f} | {errors or '-'} |")  # fmt: skip
    ceiling_path = folder / "grpc-ceiling.json"
    if ceiling_path.exists():
        ceiling = json.loads(ceiling_path.read_text())
        busiest = max((r[2] for r in rows if r[0] == "gRPC"), default=0.0)
        lines += ["", f"gRPC generator against the null engine: {ceiling['images_per_s']:,.0f} "
                  f"req/s at {ceiling['users']} users ({ceiling['generator_cores']:.2f} cores), "
                  f"{ceiling['images_per_s'] / max(busiest, 1e-9):.1f}x the busiest gRPC step."]  # fmt: skip
    if rest.get("ceilings"):
        lines += ["", f"REST: {rest['ceilings']['verdict']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        if len(argv) != 2:
            print("usage: python -m loadtest.grpc_load report FOLDER", file=sys.stderr)
            return 2
        text = compare_markdown(Path(argv[1]))
        (Path(argv[1]) / "grpc_vs_rest.md").write_text(text)
        print(text)
        return 0
    p = argparse.ArgumentParser(
        prog="python -m loadtest.grpc_load", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", default="127.0.0.1:8001", help="host:port of the gRPC endpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default=None)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.users < 1 or args.duration <= 0 or args.processes < 1:
        p.error("--users and --processes must be >= 1 and --duration > 0")
    result = run(args.target, args.model, args.users, args.duration, args.processes,
                 args.settle, args.backend)  # fmt: skip
    lat = result["latency_ms"]
    print(
        f"grpc {args.model} users={args.users}: {result['ok']} ok, "
        f"{result['images_per_s']:.1f} img/s, p50 {lat['p50'] or 0:.1f} ms, "
        f"p99 {lat['p99'] or 0:.1f} ms, errors {result['errors'] or 'none'}, "
        f"generator {result['generator_cores']:.2f} cores"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
