"""Load test settings, read from LOADTEST_* environment variables.

Plain stdlib: this module is imported by tests and by the report code, neither of which may pull
in Locust (importing Locust monkey-patches the standard library through gevent).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

PROTOCOLS = ("v1", "v2")
V2_INPUTS = ("image", "tensor")
DRIVERS = ("locust", "wrk")


class LoadtestConfigError(ValueError):
    """A LOADTEST_* setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class LoadtestConfig:
    # Base URLs of the service; several (comma list) spread the load over replicas.
    urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    # Total seconds of load, split evenly over the steps (and over backends in compare mode).
    duration_s: float = 60.0
    # Report folder.
    out: str = "loadtest-report"
    # Model to drive; empty: the first one the server lists.
    model: str = ""
    # Concurrent users of each step, in order.
    users: tuple[int, ...] = (1, 2, 4, 8, 16)
    # Backends to use; empty: every backend the server keeps loaded.
    backends: tuple[str, ...] = ()
    # Send the whole ramp once per backend instead of mixing backends per request.
    compare: bool = False
    # Which user classes run: v1 (multipart) and/or v2 (binary tensors).
    protocols: tuple[str, ...] = PROTOCOLS
    # Images in each request.
    images_per_request: int = 1
    # Load generator processes (Locust workers); one process drives about one CPU core of HTTP.
    processes: int = 1
    # What V2 users send: `image` (BYTES, encoded photos) or `tensor` (FP32, preprocessed here).
    v2_input: str = "image"
    # Longest side of the photo variants sent.
    image_sides: tuple[int, ...] = (1280, 640, 320, 160)
    # Most requests sent over the whole run; split evenly over the steps.
    max_requests: int = 100_000
    # Seconds at the start of each step that are not measured (users connect, queues fill).
    settle_s: float = 2.0
    # Per-request timeout.
    timeout_s: float = 30.0
    # Longest wait for /v2/health/ready before the first step.
    ready_timeout_s: float = 300.0
    # /metrics URLs to scrape around each step; empty: <url>/metrics of every target.
    metrics_urls: tuple[str, ...] = ()
    # Folder of test photos; resized variants are made from them at start.
    images_dir: str = ""
    # Bearer token when the server sets ESCORT_API_KEY.
    api_key: str = ""
    # Seed of the image and backend choices.
    seed: int = 0
    # Layers shown in the per-layer plot (the slowest ones).
    plot_layers: int = 24
    # Load generator: `locust` (Python users, checks every answer) or `wrk` (C; one prebuilt
    # body per protocol and backend, for rates a Python generator cannot reach).
    driver: str = "locust"
    # Path of the wrk binary; empty: `wrk` on PATH, then an unpacked .deb layout.
    wrk: str = ""
    # Most wrk threads of a step (each step uses min(users, this)): LOADTEST_PROCESSES when
    # set, else the CPU count.
    wrk_threads: int = 1
    # URL of a server running ESCORT_ENGINE=null: its rate is the HTTP layer's ceiling.
    ceiling_url: str = ""
    # Start loadtest.sink and measure the load generator's own ceiling against it.
    sink: bool = False
    # JSON file of offline per-layer timings to compare with the live per-layer metrics.
    layer_bench: str = ""

    @property
    def scrape_urls(self) -> tuple[str, ...]:
        return self.metrics_urls or tuple(url.rstrip("/") + "/metrics" for url in self.urls)

    def public(self) -> dict[str, object]:
        """The settings as written into the report, without the secret."""
        data = asdict(self)
        data["api_key"] = "set" if self.api_key else ""
        return data


def check_loopback(url: str, setting: str = "LOADTEST_URL") -> str:
    """Return the URL without a trailing slash, or raise unless it points at this machine.

    The load test is a denial-of-service tool by design; it only ever targets loopback
    (127.0.0.0/8, ::1, localhost), so a typo cannot aim it at someone else's server."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise LoadtestConfigError(f"{setting}={url!r}: use an http:// or https:// URL")
    if parts.username or parts.password:
        raise LoadtestConfigError(f"{setting}={url!r}: credentials in the URL are not supported")
    host = (parts.hostname or "").lower()
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise LoadtestConfigError(
                f"{setting}={url!r}: the load test only targets loopback (127.0.0.0/8, ::1, "
                "localhost); reach a remote server through a tunnel or "
                "`kubectl port-forward` to 127.0.0.1"
            )
    return url.strip().rstrip("/")


def _split(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item.strip() for item in value.split(",") if item.strip()))


def _number(env: Mapping[str, str], name: str, kind: type, default: float, low: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise LoadtestConfigError(f"{name}={raw!r}: not a {kind.__name__}") from None
    if value < low:
        raise LoadtestConfigError(f"{name}={raw!r}: must be at least {low}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise LoadtestConfigError(f"{name}={raw!r}: use 1 or 0")


def load_config(env: Mapping[str, str] | None = None) -> LoadtestConfig:
    """Build the config from LOADTEST_* variables, raising LoadtestConfigError on bad input."""
    env = os.environ if env is None else env
    default = LoadtestConfig()
    urls = _split(env.get("LOADTEST_URL", "")) or default.urls
    urls = tuple(check_loopback(url) for url in urls)
    metrics_urls = tuple(
        check_loopback(url, "LOADTEST_METRICS_URLS")
        for url in _split(env.get("LOADTEST_METRICS_URLS", ""))
    )
    users_raw = _split(env.get("LOADTEST_USERS", ""))
    try:
        users = tuple(int(item) for item in users_raw) or default.users
    except ValueError:
        raise LoadtestConfigError(
            f"LOADTEST_USERS={users_raw}: use a comma list of integers"
        ) from None
    if any(count < 1 for count in users):
        raise LoadtestConfigError(f"LOADTEST_USERS={users}: every step needs at least 1 user")
    protocols = tuple(p.lower() for p in _split(env.get("LOADTEST_PROTOCOLS", ""))) or PROTOCOLS
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise LoadtestConfigError(f"LOADTEST_PROTOCOLS: unknown {unknown}; use v1, v2 or both")
    backends = tuple(b.lower() for b in _split(env.get("LOADTEST_BACKENDS", "")))
    v2_input = env.get("LOADTEST_V2_INPUT", "").strip().lower() or default.v2_input
    if v2_input not in V2_INPUTS:
        raise LoadtestConfigError(f"LOADTEST_V2_INPUT={v2_input!r}: use image or tensor")
    sides_raw = _split(env.get("LOADTEST_IMAGE_SIDES", ""))
    try:
        sides = tuple(int(item) for item in sides_raw) or default.image_sides
    except ValueError:
        raise LoadtestConfigError(
            f"LOADTEST_IMAGE_SIDES={sides_raw}: use a comma list of pixel counts"
        ) from None
    if any(side < 8 for side in sides):
        raise LoadtestConfigError(f"LOADTEST_IMAGE_SIDES={sides}: each side needs 8 pixels or more")
    driver = env.get("LOADTEST_DRIVER", "").strip().lower() or default.driver
    if driver not in DRIVERS:
        raise LoadtestConfigError(f"LOADTEST_DRIVER={driver!r}: use locust or wrk")
    ceiling = env.get("LOADTEST_CEILING_URL", "").strip()
    return LoadtestConfig(
        urls=urls,
        duration_s=_number(env, "LOADTEST_DURATION_S", float, default.duration_s, 1.0),
        out=env.get("LOADTEST_OUT", "").strip() or default.out,
        model=env.get("LOADTEST_MODEL", "").strip(),
        users=users,
        backends=backends,
        compare=_flag(env, "LOADTEST_COMPARE"),
        protocols=protocols,
        images_per_request=int(_number(env, "LOADTEST_IMAGES_PER_REQUEST", int, 1, 1)),
        processes=int(_number(env, "LOADTEST_PROCESSES", int, 1, 1)),
        v2_input=v2_input,
        image_sides=sides,
        max_requests=int(_number(env, "LOADTEST_MAX_REQUESTS", int, default.max_requests, 1)),
        settle_s=_number(env, "LOADTEST_SETTLE_S", float, default.settle_s, 0.0),
        timeout_s=_number(env, "LOADTEST_TIMEOUT_S", float, default.timeout_s, 0.1),
        ready_timeout_s=_number(env, "LOADTEST_READY_TIMEOUT_S", float, default.ready_timeout_s, 0),
        metrics_urls=metrics_urls,
        images_dir=env.get("LOADTEST_IMAGES", "").strip(),
        api_key=env.get("LOADTEST_API_KEY", "").strip(),
        seed=int(_number(env, "LOADTEST_SEED", int, 0, 0)),
        plot_layers=int(_number(env, "LOADTEST_PLOT_LAYERS", int, default.plot_layers, 1)),
        driver=driver,
        wrk=env.get("LOADTEST_WRK", "").strip(),
        wrk_threads=int(_number(env, "LOADTEST_PROCESSES", int, os.cpu_count() or 1, 1)),
        ceiling_url=check_loopback(ceiling, "LOADTEST_CEILING_URL") if ceiling else "",
        sink=_flag(env, "LOADTEST_SINK"),
        layer_bench=env.get("LOADTEST_LAYER_BENCH", "").strip(),
    )
