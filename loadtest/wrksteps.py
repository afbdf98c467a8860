"""The load test's steps with wrk as the driver (LOADTEST_DRIVER=wrk).

Each step runs wrk with `users` connections and min(users, LOADTEST_PROCESSES or the CPU count)
threads: first for the settle time (not measured), then, between the two /metrics scrapes, for
the rest of the step. wrk sends prebuilt bodies, one per protocol and backend (the same picks of
photos every time, from LOADTEST_SEED), so the client's cost per request is a buffer resend; the
answers are counted by status, and a 2xx without a classification counts as `bad_answer`.
The summary of a step has the shape loadtest.report gives Locust steps, so the report, its plots
and the side-by-side table render both. wrk measures latency over all the step's answers; the
Locust driver over the successful ones.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable
from typing import Any

from loadtest.bodies import multipart_body, v2_binary_body, v2_tensor_body
from loadtest.config import LoadtestConfig
from loadtest.promtext import Scrape, get_json
from loadtest.report import server_stats
from loadtest.stages import cores_busy, worker_spread
from loadtest.wrk import RequestSpec, WrkBinary, run_wrk

TOP_K = 5  # as the Locust v1 users ask


def tensor_shape(config: LoadtestConfig, model: str, card: dict[str, Any]) -> tuple[int, int, int]:
    """[C, H, W] of the model's FP32 `input`, from its V2 metadata; the card's crop when the
    server has no /v2/models/{m} (the test stand-in)."""
    try:
        metadata = get_json(f"{config.urls[0]}/v2/models/{model}", config.timeout_s, config.api_key)
        shape = next(i["shape"] for i in metadata["inputs"] if i["name"] == "input")
        channels, height, width = (int(d) for d in shape[1:])
        return channels, height, width
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        crop = int(card["preprocessing"]["crop"])
        return 3, crop, crop


def request_specs(
    plan: Any, fixed_backend: str | None, shape: tuple[int, int, int]
) -> list[RequestSpec]:
    """One prebuilt request per protocol and backend of the step, as the Locust users build them
    (`?backend=` on v1, `parameters.backend` on V2); JPEG photos, picked with the seed."""
    config: LoadtestConfig = plan.config
    rng = random.Random(config.seed)
    jpegs = [i for i, image in enumerate(plan.images) if image.content_type == "image/jpeg"]
    candidates = jpegs or list(range(len(plan.images)))
    picks = [rng.choice(candidates) for _ in range(config.images_per_request)]
    backends: list[str | None] = [fixed_backend] if fixed_backend else list(plan.backends) or [None]
    auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    specs = []
    for protocol in config.protocols:
        for backend in backends:
            if protocol == "v1":
                body, content_type = multipart_body([plan.images[i] for i in picks])
                query = f"?top_k={TOP_K}" + (f"&backend={backend}" if backend else "")
                path = f"/v1/models/{plan.model}/classify{query}"
                headers = {"Content-Type": content_type, **auth}
            else:
                if plan.tensors:
                    channels, height, width = shape
                    rows = [plan.tensors[i] for i in picks]
                    if height != width or any(
                        len(r) != 4 * channels * height * width for r in rows
                    ):
                        raise RuntimeError(f"the model's input is {list(shape)}, but the tensors "
                                           "made from its card's preprocessing do not match")  # fmt: skip
                    body, length = v2_tensor_body(rows, height, backend)
                else:
                    body, length = v2_binary_body([plan.images[i] for i in picks], backend)
                path = f"/v2/models/{plan.model}/infer"
                headers = {"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(length), **auth}  # fmt: skip
            specs.append(
                RequestSpec(path, headers, body, protocol, backend or "default", len(picks))
            )
    return specs


def generator_cores(result: dict[str, Any]) -> float | None:
    """Cores the wrk processes kept busy over their run (None: not recorded)."""
    if "cpu_s" not in result:
        return None
    return float(result["cpu_s"]) / max(float(result["duration_s"]), 1e-9)


def wrk_traffic(result: dict[str, Any], images_per_request: int) -> dict[str, Any]:
    """wrk's numbers in the report's traffic shape (latency in ms; rates of correct answers)."""
    window = max(float(result["duration_s"]), 1e-9)
    latency = {k: v * 1e3 for k, v in result["latency_s"].items()}
    answered = result["requests"] > 0
    return {
        "requests": int(result["requests"]),
        "ok": int(result["ok"]),
        "throughput_rps": result["ok"] / window,
        "images_per_s": result["ok"] * images_per_request / window,
        "latency_ms": {
            k: (latency.get(k) if answered else None)
            for k in ("p50", "p90", "p95", "p99", "mean", "max")
        },
        "errors": dict(result["errors"]),
    }


def wrk_step_summary(
    index: int,
    phase: str,
    users: int,
    result: dict[str, Any],
    delta: Scrape,
    model: str,
    specs: list[RequestSpec],
    during: Scrape | None = None,
) -> dict[str, Any]:
    """A wrk step as loadtest.report.step_summary shapes a Locust one (`during`: a scrape taken
    while the step ran, for the connections each worker held). wrk cannot tell which
    rotated request an answer belongs to, so by_backend and by_protocol are filled only when the
    step sent one backend (compare mode) or one protocol."""
    traffic = wrk_traffic(result, specs[0].images)
    summary: dict[str, Any] = {"step": index, "phase": phase, "users": users,
                               "window_s": float(result["duration_s"]), **traffic}  # fmt: skip
    backends = {spec.backend for spec in specs}
    protocols = {spec.protocol for spec in specs}
    summary["by_backend"] = {backends.pop(): traffic} if len(backends) == 1 else {}
    summary["by_protocol"] = {protocols.pop(): traffic} if len(protocols) == 1 else {}
    summary["server"] = server_stats(delta, model)
    summary["driver"] = {"name": "wrk", "budget_reached": bool(result.get("budget_reached")),
                         "bytes_read": int(result.get("bytes", 0)),
                         "cores_busy": generator_cores(result)}  # fmt: skip
    summary["server"]["cores_busy"] = cores_busy(delta, summary["window_s"])
    summary["server"]["workers"] = worker_spread(delta, summary["window_s"], during)
    return summary


class WrkDriver:
    """The wrk side of a run: its binary, the model's tensor shape, and the runs of each step."""

    def __init__(self, plan: Any, binary: WrkBinary) -> None:
        self.plan = plan
        self.binary = binary
        self.config: LoadtestConfig = plan.config
        needs_shape = bool(plan.tensors)
        self.shape = tensor_shape(self.config, plan.model, plan.card) if needs_shape else (3, 0, 0)
        self.processes = self.config.wrk_threads

    def specs(self, fixed_backend: str | None) -> list[RequestSpec]:
        return request_specs(self.plan, fixed_backend, self.shape)

    def measure(
        self,
        urls: tuple[str, ...],
        specs: list[RequestSpec],
        users: int,
        seconds: float,
        budget: int = 0,
        think_ms: float = 0,
    ) -> dict[str, Any]:
        return run_wrk(self.binary, urls, specs, users, self.config.wrk_threads, seconds,
                       self.config.timeout_s, budget, think_ms)  # fmt: skip

    def step(
        self,
        specs: list[RequestSpec],
        users: int,
        step_s: float,
        settle_s: float,
        budget: int,
        scrape: Callable[[], list[Scrape]],
        think_ms: float = 0,
    ) -> tuple[dict[str, Any], list[Scrape], list[Scrape], list[Scrape]]:
        """Settle (unmeasured run), scrape, measured run, scrape; and one scrape halfway through
        the measured run, for what a server holds while loaded (its connections): wrk's
        connections are gone by the time the last scrape is taken."""
        if settle_s >= 0.5:
            self.measure(self.config.urls, specs, users, settle_s, think_ms=think_ms)
        before = scrape()
        measured_s = max(1.0, step_s - settle_s)
        during: list[list[Scrape]] = []

        def halfway() -> None:
            with contextlib.suppress(Exception):  # a missed scrape only blanks a column
                during.append(scrape())

        timer = threading.Timer(measured_s / 2, halfway)
        timer.start()
        try:
            result = self.measure(self.config.urls, specs, users, measured_s, budget, think_ms)
        finally:
            timer.cancel()
            timer.join()
        after = scrape()
        return result, before, after, during[0] if during else []

    def quit(self) -> None:
        """Nothing runs between steps: each wrk run ends with its step."""

    def exceptions(self) -> list[dict[str, Any]]:
        return []
