"""Locust users for Escort Serve: one speaks v1 multipart, the other KServe V2 binary tensors
(the encoded photos as a BYTES `image` input, or with LOADTEST_V2_INPUT=tensor, the photos
preprocessed here into the FP32 `input` tensor, which leaves decoding out of the server's work).

Both send real photos at several sizes, pick a backend for each request (or the one the
compare mode fixes), and check the answer's shape, so a 200 with a wrong body counts as an
error. `python -m loadtest.run` drives them headless and writes the report; the file also works
with Locust's own CLI or web UI:

    PYTHONPATH=. locust -f loadtest/locustfile.py --host http://127.0.0.1:8000
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
from locust import FastHttpUser, constant, events, task

from loadtest.bodies import multipart_body, v2_binary_body, v2_tensor_body
from loadtest.config import LoadtestConfig, check_loopback, load_config
from loadtest.images import LoadImage, make_variants, preprocessed_tensor
from loadtest.promtext import get_json

V1 = "v1"
V2 = "v2"
TOP_K = 5


@dataclass
class Sample:
    """One finished request, as the report needs it."""

    step: int
    end_s: float  # time.monotonic() when the answer was read
    latency_ms: float
    status: int  # HTTP status; 0 when no answer came (refused, reset, timeout)
    ok: bool
    protocol: str
    backend: str
    images: int


@dataclass
class LoadPlan:
    """What every user reads before each request; the runner changes it between steps."""

    config: LoadtestConfig
    model: str
    backends: list[str]
    images: list[LoadImage]
    card: dict[str, Any] = field(default_factory=dict)
    # Preprocessed FP32 inputs, one per image, when V2 users send tensors.
    tensors: list[bytes] = field(default_factory=list)
    fixed_backend: str | None = None
    step: int = -1  # samples are recorded only while step >= 0
    budget: int = 0  # requests left in this step; users idle at zero
    inflight: int = 0
    samples: list[Sample] = field(default_factory=list)
    _next_target: int = 0

    def take_request(self) -> bool:
        if self.budget <= 0:
            return False
        self.budget -= 1  # gevent switches only on I/O, so no lock is needed
        self.inflight += 1
        return True

    def backend_for(self, rng: random.Random) -> str | None:
        if self.fixed_backend:
            return self.fixed_backend
        return rng.choice(self.backends) if self.backends else None

    def target(self) -> str:
        """Round-robin over LOADTEST_URL entries, as a load balancer in front of replicas would."""
        urls = self.config.urls
        self._next_target = (self._next_target + 1) % len(urls)
        return urls[self._next_target]


PLAN: LoadPlan | None = None


def discover(config: LoadtestConfig) -> tuple[str, list[str], dict[str, Any]]:
    """The model to drive, the backends to use, and the model's card from /v1/models."""
    listing = get_json(config.urls[0] + "/v1/models", config.timeout_s, config.api_key)
    cards = {card["name"]: card for card in listing.get("models", [])}
    if not cards:
        raise RuntimeError(f"{config.urls[0]}/v1/models lists no models")
    model = config.model or next(iter(cards))
    if model not in cards:
        raise RuntimeError(f"LOADTEST_MODEL={model!r} is not served; the server has {list(cards)}")
    card = cards[model]
    loaded = [str(b) for b in card.get("backends") or []]
    if config.backends:
        missing = [b for b in config.backends if loaded and b not in loaded]
        if missing:
            raise RuntimeError(
                f"LOADTEST_BACKENDS asks for {missing}, but {model} has only {loaded} loaded "
                "(the server's ESCORT_BACKENDS)"
            )
        backends = list(config.backends)
    else:
        backends = loaded
    return model, backends, card


def build_plan(config: LoadtestConfig) -> LoadPlan:
    model, backends, card = discover(config)
    images = make_variants(config.images_dir, config.image_sides)
    tensors = []
    if config.v2_input == "tensor" and "v2" in config.protocols:
        if "preprocessing" not in card:
            raise RuntimeError(f"/v1/models gives no preprocessing for {model}; use images")
        tensors = [preprocessed_tensor(image, card["preprocessing"]) for image in images]
    return LoadPlan(config, model, backends, images, card=card, tensors=tensors)


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, context=None,
            exception=None, **kwargs) -> None:  # fmt: skip
    plan = PLAN
    if plan is None or not context or "protocol" not in context:
        return
    plan.inflight = max(0, plan.inflight - 1)
    if plan.step < 0:
        return
    status = int(getattr(response, "status_code", 0) or 0)
    plan.samples.append(
        Sample(
            step=plan.step,
            end_s=time.monotonic(),
            latency_ms=float(response_time or 0.0),
            status=status,
            ok=exception is None,
            protocol=context["protocol"],
            backend=context["backend"],
            images=context["images"],
        )
    )


@events.test_start.add_listener
def _plan_for_locust_cli(environment, **kwargs) -> None:
    """Under Locust's own CLI or web UI, build the plan from LOADTEST_* and --host."""
    global PLAN
    if PLAN is not None:
        return
    config = load_config()
    if environment.host:
        config = replace(config, urls=(check_loopback(environment.host, "--host"),))
    PLAN = build_plan(config)
    PLAN.step, PLAN.budget = 0, config.max_requests


class EscortUser(FastHttpUser):
    """Shared by both protocols: a closed loop (no think time) over random images."""

    abstract = True
    wait_time = constant(0)
    protocol = ""
    _spawned = 0

    def __init__(self, environment) -> None:
        config = PLAN.config if PLAN else load_config({})  # the defaults
        self.network_timeout = self.connection_timeout = config.timeout_s
        super().__init__(environment)
        # Each user its own stream of choices, the same streams on every run with one seed.
        EscortUser._spawned += 1
        self.rng = random.Random(config.seed * 1_000_003 + EscortUser._spawned)

    def _prepare(self) -> tuple[LoadPlan, list[int], str | None] | None:
        """The plan, the indices of this request's images, and its backend; None to idle."""
        plan = PLAN
        if plan is None or not plan.take_request():
            gevent.sleep(0.05)
            return None
        count = plan.config.images_per_request
        picks = [self.rng.randrange(len(plan.images)) for _ in range(count)]
        return plan, picks, plan.backend_for(self.rng)

    def _headers(self, plan: LoadPlan, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type}
        if plan.config.api_key:
            headers["Authorization"] = f"Bearer {plan.config.api_key}"
        return headers


class V1MultipartUser(EscortUser):
    """POST /v1/models/{m}/classify with the images as multipart `image` fields."""

    protocol = V1

    @task
    def classify(self) -> None:
        prepared = self._prepare()
        if prepared is None:
            return
        plan, picks, backend = prepared
        images = [plan.images[i] for i in picks]
        body, content_type = multipart_body(images)
        query = f"?top_k={TOP_K}" + (f"&backend={backend}" if backend else "")
        url = f"{plan.target()}/v1/models/{plan.model}/classify{query}"
        context = {"protocol": V1, "backend": backend or "default", "images": len(images)}
        with self.client.post(
            url,
            data=body,
            headers=self._headers(plan, content_type),
            name="v1 classify",
            context=context,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            try:
                results = response.json()["results"]
            except (ValueError, KeyError, TypeError):
                response.failure("answer is not the v1 classify JSON")
                return
            if len(results) != len(images) or not results[0].get("predictions"):
                response.failure(f"{len(results)} results for {len(images)} images")


class V2BinaryUser(EscortUser):
    """POST /v2/models/{m}/infer: a BYTES `image` tensor and binary probabilities back."""

    protocol = V2

    @task
    def infer(self) -> None:
        prepared = self._prepare()
        if prepared is None:
            return
        plan, picks, backend = prepared
        if plan.tensors:
            crop = int(plan.card["preprocessing"]["crop"])
            body, header_length = v2_tensor_body([plan.tensors[i] for i in picks], crop, backend)
        else:
            body, header_length = v2_binary_body([plan.images[i] for i in picks], backend)
        headers = self._headers(plan, "application/octet-stream")
        headers["Inference-Header-Content-Length"] = str(header_length)
        context = {"protocol": V2, "backend": backend or "default", "images": len(picks)}
        with self.client.post(
            f"{plan.target()}/v2/models/{plan.model}/infer",
            data=body,
            headers=headers,
            name="v2 infer",
            context=context,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            check = _check_v2_answer(response.content or b"", response.headers, len(picks))
            if check:
                response.failure(check)


def _check_v2_answer(content: bytes, headers: Any, count: int) -> str:
    """Empty when the answer holds `probabilities` [count, classes] as binary FP32."""
    try:
        length = int(headers.get("Inference-Header-Content-Length", "0"))
        header = json.loads(content[:length] if length else content)
        output = next(o for o in header["outputs"] if o["name"] == "probabilities")
    except (ValueError, KeyError, TypeError, StopIteration):
        return "answer is not a V2 response with `probabilities`"
    shape = output.get("shape") or []
    if not shape or shape[0] != count:
        return f"probabilities shape {shape} for {count} images"
    size = (output.get("parameters") or {}).get("binary_data_size")
    if size is not None and len(content) - length != size:
        return f"binary part is {len(content) - length} bytes, header says {size}"
    return ""
