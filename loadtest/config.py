"""Load test settings: `LOADTEST_<NAME>` environment variables, typed through pydantic-settings.

`LoadtestSettings` is the one list of settings (type, default, one-line description), in the
style of service/config.py; `python -m loadtest.config` prints the table docs/operations.md
carries. `load_config` validates them and resolves them into `LoadtestConfig`, the frozen value
the rest of the load test reads (and writes into the report). A bad value raises
LoadtestConfigError naming the variable; a LOADTEST_* variable that names no setting is only
warned about (`unknown_setting_warnings`), since the run can still go ahead.

No Locust here: tests and the report code import this module, and importing Locust
monkey-patches the standard library through gevent.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

ENV_PREFIX = "LOADTEST_"
PROTOCOLS = ("v1", "v2")
V2_INPUTS = ("image", "tensor")
DRIVERS = ("locust", "wrk")
# NoDecode: a comma list, not the JSON pydantic-settings would expect for a tuple.
CommaList = Annotated[tuple[str, ...], NoDecode]
IntList = Annotated[tuple[int, ...], NoDecode]


class LoadtestConfigError(ValueError):
    """A LOADTEST_* setting that cannot be used; the message names it."""


def _setting(default: Any, description: str, shown: str | None = None, **limits: Any) -> Any:
    """A field with its description and, where the raw default reads badly, the table's text."""
    extra = {"shown": shown} if shown else None
    return Field(default, description=description, json_schema_extra=extra, **limits)


class LoadtestSettings(BaseSettings):
    """The LOADTEST_* variables as typed. Field names are the variable names without the prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="forbid", frozen=True
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any,
                                   **others: Any) -> tuple[Any, ...]:  # fmt: skip
        # load_settings reads the environment itself (through _MappingSource), so that a test
        # can hand it a mapping; nothing else (dotenv, secrets) is a source.
        return (init_settings,)

    # One line per setting (fmt: off): the list reads as the table it generates.
    # fmt: off
    url: CommaList = _setting(("http://127.0.0.1:8000",), "Base URL of the service; a comma list spreads requests round-robin over replicas. Loopback only.")
    duration_s: float = _setting(60.0, "Total seconds of load, split evenly over the steps (and over the backends in compare mode).", ge=1)
    out: str = _setting("loadtest-report", "Report folder.")
    model: str = _setting("", "Model to drive.", "first served")
    users: IntList = _setting((1, 2, 4, 8, 16), "Concurrent users of each step, in order.")
    think_ms: IntList = _setting((0,), "Mean pause of each user between its requests (exponential; wrk only): one value, or one per `LOADTEST_USERS` step. Many users that think arrive almost like an open load, which is how latency at a given share of saturation is read; 0: back to back.")
    backends: CommaList = _setting((), "Backends to use (each must be in the server's `ESCORT_BACKENDS`).", "all loaded")
    compare: bool = _setting(False, "`1`: run the ramp once per backend (side by side).")
    protocols: Annotated[tuple[Literal["v1", "v2"], ...], NoDecode] = _setting(PROTOCOLS, "User classes to run. Locust splits the users by class, so a 1-user step runs only the first.")
    v2_input: Literal["image", "tensor"] = _setting("image", "`tensor`: V2 users send preprocessed FP32 `input` tensors instead of encoded images.")
    images_per_request: int = _setting(1, "Images in each request.", ge=1)
    image_sides: IntList = _setting((1280, 640, 320, 160), "Long sides of the photo variants.")
    images: str = _setting("", "Folder of `.jpg`/`.png` photos to make the variants from.", "`tests/data`")
    max_requests: int = _setting(100000, "Most requests in the whole run, split evenly over the steps.", ge=1)
    settle_s: float = _setting(2.0, "Unmeasured seconds at the start of each step (at most a quarter of the step).", ge=0)
    driver: Literal["locust", "wrk"] = _setting("locust", "Load generator: `locust` (Python users, checks each answer) or `wrk` (C; POSTs one prebuilt body per protocol and backend; users = wrk connections, threads = min(users, `LOADTEST_PROCESSES` or the CPU count)).")
    wrk: str = _setting("", "Path of the wrk binary (exit status 2 when none is found). An unpacked .deb's libraries go on wrk's own LD_LIBRARY_PATH.", "`wrk` on PATH, then `/tmp/debs/usr/bin/wrk` or `.gpu-debs/root/usr/bin/wrk`")
    sink: bool = _setting(False, "`1`: before the steps, start `python -m loadtest.sink` on a free loopback port and measure the load generator's ceiling against it at the largest step's concurrency. The report says whether that ceiling is at least 2x every step's rate.")
    ceiling_url: str = _setting("", "URL of a second server with `ESCORT_ENGINE=null`. Before the steps, its rate at the largest concurrency is measured as the HTTP layer's ceiling. Loopback only.", "(unset)")
    layer_bench: str = _setting("", "JSON list of offline per-layer records `{model, backend, batch, layer, op, seconds}` (`python -m bench.layer_times`). The report compares them per backend with the live per-layer means of every step, weighted by the batch sizes its sampled batches ran at (`--batch` with every bucket of the server), and details the step with the fullest batches (within 25% or not).", "(unset)")
    timeout_s: float = _setting(30.0, "Per-request timeout. No answer in time counts as status 0.", ge=0.1)
    ready_timeout_s: float = _setting(300.0, "Longest wait for `/v2/health/ready` (exit status 3 after it).", ge=0)
    processes: int = _setting(1, "Load generator processes: Locust workers under one master. One process drives about one CPU core of HTTP. Raise it for GPU servers.", ge=1)
    metrics_urls: CommaList = _setting((), "`/metrics` URLs to scrape around each step. Their counters and histograms are added up.", "`<url>/metrics` of each target")
    api_key: SecretStr | None = _setting(None, "Bearer token, when the server sets `ESCORT_API_KEY`.", "(unset)")
    seed: int = _setting(0, "Seed of the image and backend choices.", ge=0)
    plot_layers: int = _setting(24, "Layers shown in the per-layer plot, slowest first.", ge=1)
    gpus: int = _setting(2, "`loadtest.scaling` only: GPUs of the second run (one replica each).", ge=2)
    scaling_mode: Literal["replicas", "one-process"] = _setting("replicas", "`loadtest.scaling` only: `one-process` starts a single server that sees every GPU.")
    base_port: int = _setting(8001, "`loadtest.scaling` only: port of the first server it starts.", ge=1, le=65535)
    server_cmd: str = _setting("", "`loadtest.scaling` only: server command; `{port}` is replaced.", "`<python> -m service.cli serve`")
    # fmt: on
    # fmt: on

    @field_validator("url", "backends", "protocols", "metrics_urls", "users", "image_sides",
                     mode="before")  # fmt: skip
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            # Order matters (steps run in order), repeats do not.
            return tuple(dict.fromkeys(str(item).strip() for item in value if str(item).strip()))
        return value

    @field_validator("backends", "protocols", "v2_input", "driver", "scaling_mode", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(item.lower() for item in value)
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("url", "users", "protocols", "image_sides")
    @classmethod
    def _not_empty(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("give at least one")
        return value

    @field_validator("think_ms", mode="before")
    @classmethod
    def _think_list(cls, value: Any) -> Any:
        # Not through _split: a value repeats once per step ("0,0,100").
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @model_validator(mode="after")
    def _think_per_step(self) -> LoadtestSettings:
        if len(self.think_ms) not in (1, len(self.users)):
            raise ValueError(
                f"think_ms: give one value or one per step ({len(self.users)} in users), "
                f"not {len(self.think_ms)}"
            )
        if any(ms < 0 for ms in self.think_ms):
            raise ValueError("think_ms: a pause cannot be negative")
        if any(self.think_ms) and self.driver != "wrk":
            raise ValueError("think_ms: only the wrk driver pauses between requests")
        return self

    @field_validator("users")
    @classmethod
    def _users(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(count < 1 for count in value):
            raise ValueError("every step needs at least 1 user")
        return value

    @field_validator("image_sides")
    @classmethod
    def _sides(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(side < 8 for side in value):
            raise ValueError("each side needs 8 pixels or more")
        return value


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (os.environ or a test's),
    with blanks stripped and an empty value meaning the default, as the dataclass era did."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(LoadtestSettings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v.strip() for k, v in self._env.items() if v and v.strip()}


def load_settings(env: Mapping[str, str] | None = None) -> LoadtestSettings:
    """The settings from `env` (default: the environment); LoadtestConfigError names each bad one."""
    source = _MappingSource(os.environ if env is None else env)
    try:
        return LoadtestSettings(**source())
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ENV_PREFIX + str(error["loc"][0]).upper() if error["loc"] else "?"
            given = "" if name.endswith("API_KEY") else f" (got {error.get('input')!r})"
            lines.append(f"{name}: {error['msg'].removeprefix('Value error, ')}{given}")
        raise LoadtestConfigError("invalid settings: " + "; ".join(lines)) from None


def unknown_setting_warnings(env: Mapping[str, str] | None = None) -> list[str]:
    """One line per LOADTEST_* variable that names no setting (most likely a typo)."""
    env = os.environ if env is None else env
    known = [name.upper() for name in LoadtestSettings.model_fields]
    lines = []
    for name in sorted(env):
        rest = name.upper().removeprefix(ENV_PREFIX)
        if not name.upper().startswith(ENV_PREFIX) or rest in known:
            continue
        # Matched without the prefix, which every name shares and would make anything "close".
        guess = difflib.get_close_matches(rest, known, n=1, cutoff=0.6)
        hint = f"; did you mean {ENV_PREFIX}{guess[0]}?" if guess else ""
        lines.append(f"{name} is not a setting and is ignored{hint}")
    return lines


@dataclass(frozen=True)
class LoadtestConfig:
    """The resolved settings the load test runs with (see LoadtestSettings for each one)."""

    urls: tuple[str, ...]
    duration_s: float
    out: str
    model: str
    users: tuple[int, ...]
    think_ms: tuple[int, ...]
    backends: tuple[str, ...]
    compare: bool
    protocols: tuple[str, ...]
    images_per_request: int
    processes: int
    v2_input: str
    image_sides: tuple[int, ...]
    max_requests: int
    settle_s: float
    timeout_s: float
    ready_timeout_s: float
    metrics_urls: tuple[str, ...]
    images_dir: str
    api_key: str
    seed: int
    plot_layers: int
    driver: str
    wrk: str
    # Most wrk threads of a step: LOADTEST_PROCESSES when set, else the CPU count.
    wrk_threads: int
    ceiling_url: str
    sink: bool
    layer_bench: str

    def think_for(self, step: int) -> int:
        """The mean pause of LOADTEST_USERS step `step` (0-based)."""
        return self.think_ms[step] if len(self.think_ms) > 1 else self.think_ms[0]

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


def resolve(settings: LoadtestSettings) -> LoadtestConfig:
    """The run's config from validated settings: loopback checked, derived values filled in."""
    s = settings
    return LoadtestConfig(
        urls=tuple(check_loopback(url) for url in s.url),
        metrics_urls=tuple(check_loopback(u, "LOADTEST_METRICS_URLS") for u in s.metrics_urls),
        ceiling_url=check_loopback(s.ceiling_url, "LOADTEST_CEILING_URL") if s.ceiling_url else "",
        images_dir=s.images,
        api_key=s.api_key.get_secret_value() if s.api_key else "",
        wrk_threads=s.processes if "processes" in s.model_fields_set else os.cpu_count() or 1,
        **{name: getattr(s, name) for name in _SAME_NAMES},
    )


_SAME_NAMES = ("duration_s", "out", "model", "users", "think_ms", "backends", "compare", "protocols",
               "images_per_request", "processes", "v2_input", "image_sides", "max_requests",
               "settle_s", "timeout_s", "ready_timeout_s", "seed", "plot_layers", "driver", "wrk",
               "sink", "layer_bench")  # fmt: skip


def load_config(env: Mapping[str, str] | None = None) -> LoadtestConfig:
    """Build the config from LOADTEST_* variables, raising LoadtestConfigError on bad input."""
    return resolve(load_settings(env))


def _type_text(name: str) -> str:
    annotation = LoadtestSettings.model_fields[name].annotation
    text = {int: "int", float: "float", str: "str", bool: "bool"}.get(annotation)  # type: ignore[call-overload]
    if text:
        return text
    if name in ("users", "image_sides", "think_ms"):
        return "comma list of int"
    if name == "protocols":
        return "comma list of v1\\|v2"
    if name == "api_key":
        return "secret str"
    args = getattr(annotation, "__args__", ())
    if all(isinstance(arg, str) for arg in args) and args:  # a Literal
        return "\\|".join(args)
    return "comma list"


def _default_text(name: str) -> str:
    field = LoadtestSettings.model_fields[name]
    shown = (field.json_schema_extra or {}).get("shown")  # type: ignore[union-attr]
    if shown:
        return str(shown)
    value = field.default
    if isinstance(value, bool):
        return f"`{int(value)}`"
    if isinstance(value, tuple):
        return f"`{','.join(str(v) for v in value)}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def settings_table_markdown() -> str:
    """The settings table of docs/operations.md, generated from LoadtestSettings."""
    rows = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in LoadtestSettings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `{ENV_PREFIX}{name.upper()}` | {_type_text(name)} | {_default_text(name)} "
            f"| {description} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_table_markdown())
