"""A small stand-in for Escort Serve with known, deterministic behaviour, for load test tests.

It speaks the same endpoints and exports the same metric names and labels as the contract
(docs in /work/shared product.md), decodes every image it gets (so a broken image from the load
test is a 400), and takes fixed times: per request `compute_ms[backend]` of sleep, and per layer
`layer_ms[backend] * (i + 1)` observed, so that a report built from its metrics has exact
expected values. Every `STANDIN_FAIL_EVERY`-th inference request is refused with 503.

Run: `python -m uvicorn tests.ops.standin_app:create_app --factory --port 8123`
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
from collections import Counter

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as PromCounter

MODEL = "standin-net"
CROP = 224
PREPROCESSING = {"resize": 256, "crop": CROP, "mean": [127.0] * 3, "std": [128.0] * 3}
CLASSES = 10
LAYERS = ("conv1", "block1.conv", "block2.conv", "fc")
LAYER_MS = {"sparse": 1.0, "dense": 2.0, "auto": 1.0}
COMPUTE_MS = {"sparse": 4.0, "dense": 8.0, "auto": 4.0}


def _metrics(registry: CollectorRegistry) -> dict[str, object]:
    return {
        "requests": PromCounter("escort_requests", "r", ["model", "backend", "protocol", "code"],
                                registry=registry),
        "request": Histogram("escort_request_duration_seconds", "d", ["model", "backend"],
                             registry=registry),
        "queue": Histogram("escort_queue_duration_seconds", "q", ["model"], registry=registry),
        "preprocess": Histogram("escort_preprocess_duration_seconds", "p", ["model"],
                                registry=registry),
        "compute": Histogram("escort_compute_duration_seconds", "c", ["model", "backend"],
                             registry=registry),
        "batch": Histogram("escort_batch_size", "b", ["model", "backend"],
                           buckets=(1, 2, 4, 8, 16, 32), registry=registry),
        "depth": Gauge("escort_queue_depth", "q", ["model"], registry=registry),
        "rejected": PromCounter("escort_rejected", "r", ["model", "reason"], registry=registry),
        "layer": Histogram("escort_layer_duration_seconds", "l",
                           ["model", "backend", "layer", "op"], registry=registry),
        "sparsity": Gauge("escort_layer_sparsity", "s", ["model", "layer"], registry=registry),
        "ready": Gauge("escort_model_ready", "r", ["model"], registry=registry),
    }  # fmt: skip


def create_app() -> FastAPI:
    backends = [b for b in os.environ.get("STANDIN_BACKENDS", "sparse,dense").split(",") if b]
    fail_every = int(os.environ.get("STANDIN_FAIL_EVERY", "0"))
    registry = CollectorRegistry()
    m = _metrics(registry)
    seen: Counter[str] = Counter()
    app = FastAPI()
    for layer in LAYERS:
        m["sparsity"].labels(MODEL, layer).set(0.9)
    m["ready"].labels(MODEL).set(1)

    async def run_batch(images: list[bytes], backend: str, protocol: str) -> np.ndarray:
        for data in images:
            if len(data) == 3 * CROP * CROP * 4:  # a preprocessed FP32 tensor row
                row = np.frombuffer(data, dtype="<f4")
                seen["tensor"] += 1
                seen["tensor_finite"] += int(np.isfinite(row).all() and abs(row.mean()) < 3)
                continue
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                seen[f"size:{image.width}x{image.height}"] += 1
                seen[f"format:{image.format}"] += 1
        seen[f"protocol:{protocol}"] += 1
        seen[f"backend:{backend}"] += 1
        m["queue"].labels(MODEL).observe(0.001)
        m["preprocess"].labels(MODEL).observe(0.002)
        await asyncio.sleep(COMPUTE_MS[backend] / 1e3)
        m["compute"].labels(MODEL, backend).observe(COMPUTE_MS[backend] / 1e3)
        m["batch"].labels(MODEL, backend).observe(len(images))
        for index, layer in enumerate(LAYERS):
            op = backend if layer != "fc" else "linear"
            m["layer"].labels(MODEL, backend, layer, op).observe(
                LAYER_MS[backend] * (index + 1) / 1e3
            )
        probabilities = np.full((len(images), CLASSES), 1.0 / CLASSES, dtype=np.float32)
        probabilities[:, 3] = 0.5
        return probabilities

    def refuse(backend: str, protocol: str) -> Response | None:
        seen["inference"] += 1
        if fail_every and seen["inference"] % fail_every == 0:
            m["requests"].labels(MODEL, backend, protocol, "503").inc()
            m["rejected"].labels(MODEL, "queue_full").inc()
            return JSONResponse({"error": "queue full"}, 503, headers={"Retry-After": "1"})
        return None

    def pick(backend: str | None) -> str:
        return backend or backends[0]

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        card = {"name": MODEL, "backends": backends, "precision": "fp32",
                "device": os.environ.get("ESCORT_DEVICE", "cpu"),
                "max_batch_size": 32, "architecture": "standin",
                "preprocessing": PREPROCESSING}  # fmt: skip
        return {"models": [card]}

    @app.get("/standin/seen")
    async def get_seen() -> dict[str, int]:
        return dict(seen)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/models/{model}/classify")
    async def classify(request: Request, model: str, top_k: int = 5, backend: str | None = None):
        chosen = pick(backend)
        refused = refuse(chosen, "v1")
        if refused:
            return refused
        form = await request.form()
        images = [await part.read() for part in form.getlist("image")]
        probabilities = await run_batch(images, chosen, "v1")
        m["requests"].labels(MODEL, chosen, "v1", "200").inc()
        m["request"].labels(MODEL, chosen).observe(COMPUTE_MS[chosen] / 1e3)
        results = [
            {"predictions": [{"label": str(i), "index": int(i), "score": float(row[i])}
                             for i in np.argsort(-row)[:top_k]]}
            for row in probabilities
        ]  # fmt: skip
        return {"model": model, "backend": chosen, "results": results}

    @app.post("/v2/models/{model}/infer")
    async def infer(request: Request, model: str) -> Response:
        body = await request.body()
        length = int(request.headers["inference-header-content-length"])
        header = json.loads(body[:length])
        chosen = pick((header.get("parameters") or {}).get("backend"))
        refused = refuse(chosen, "v2")
        if refused:
            return refused
        raw, images, offset = body[length:], [], 0
        if header["inputs"][0]["name"] == "input":
            count, row = header["inputs"][0]["shape"][0], 3 * CROP * CROP * 4
            if header["inputs"][0]["shape"] != [count, 3, CROP, CROP] or len(raw) != count * row:
                return JSONResponse({"error": "bad input tensor"}, 400)
            images, offset = [raw[i * row : (i + 1) * row] for i in range(count)], len(raw)
        while offset < len(raw):
            (size,) = struct.unpack_from("<I", raw, offset)
            images.append(raw[offset + 4 : offset + 4 + size])
            offset += 4 + size
        probabilities = await run_batch(images, chosen, "v2")
        m["requests"].labels(MODEL, chosen, "v2", "200").inc()
        m["request"].labels(MODEL, chosen).observe(COMPUTE_MS[chosen] / 1e3)
        data = probabilities.tobytes()
        out = {"model_name": model, "outputs": [{
            "name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
            "parameters": {"binary_data_size": len(data)}}]}  # fmt: skip
        head = json.dumps(out).encode()
        return Response(head + data, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})  # fmt: skip

    return app
