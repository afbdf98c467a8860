"""The one typed configuration of the service.

Every setting is an `ESCORT_<NAME>` environment variable. `ESCORT_CONFIG` may name a TOML file
whose keys are the same names in lower case without the prefix (`max_batch_size = 16`); the
environment wins over the file, and the file over the defaults. An invalid value stops the
service at startup with a message that names the setting and what is wrong with it.

`python -m service.config` prints the settings table that README.md carries.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "ESCORT_"
CONFIG_FILE_VAR = "ESCORT_CONFIG"
BACKEND_NAMES = ("dense", "sparse", "auto")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")

Backend = Literal["dense", "sparse", "auto"]
CommaList = Annotated[tuple[str, ...], NoDecode]


class ConfigError(ValueError):
    """Settings that cannot be used; the message names each bad setting and why."""


def default_worker_count(cores: int) -> int:
    """HTTP workers for `cores` usable cores. On the H200's 16-core host eight workers were all
    busy (8.2 cores) at the HTTP ceiling while the engine process used under two, so the
    workers get every core but four, yet never fewer than half of them, nor more than 16."""
    return max(1, min(16, max(cores // 2, cores - 4)))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # a container's CPU set, not the host's
    except (AttributeError, OSError):
        return os.cpu_count() or 2


class Settings(BaseSettings):
    """Escort Serve settings (environment variables with the ESCORT_ prefix)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
        frozen=True,
    )

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    grpc: bool = Field(True, description="Serve KServe V2 over gRPC too, on ESCORT_GRPC_PORT.")
    grpc_port: int = Field(
        8001, ge=1, le=65535, description="TCP port of the gRPC endpoint (Triton's default)."
    )
    models: CommaList = Field(
        ("efficientnet-lite0",),
        description="Comma list of model manifests in the models folder to serve.",
    )
    backend: Backend = Field("auto", description="Backend for requests that do not name one.")
    backends: CommaList = Field(
        (),
        description="Comma list of backends kept loaded (requests may pick one); empty: just "
        "the default backend.",
    )
    device: str = Field("auto", description="Where to run: auto picks the GPU when there is one.")
    precision: Literal["fp32", "tf32", "fp16"] = Field(
        "fp32", description="Arithmetic of the engine; fp32 keeps TF32 off."
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="Most images the batcher puts in one engine call."
    )
    max_batch_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="Longest wait for a batch to fill, counted from its oldest request.",
    )
    batch_bucket_step: int = Field(
        4,
        ge=0,
        le=1024,
        description="Batch sizes that get a CUDA graph: powers of two up to N, then every N "
        "rows up to the max batch, so a partial batch pads at most N - 1 rows (0: powers of "
        "two only). Smaller N: lower latency below saturation, more graphs to tune at start.",
    )
    max_queue_size: int = Field(
        512,
        ge=1,
        description="Most images waiting per model and backend; beyond it requests get 503.",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline of a request; a V2 `timeout` parameter may only shorten it.",
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Largest decoded image (width x height) accepted; stops decompression bombs.",
    )
    max_images_per_request: int = Field(
        64, ge=1, description="Most images (or tensor rows) one request may carry."
    )
    layer_profile_every: int = Field(
        1000,
        ge=0,
        description="Time each layer of 1 batch in N (0 turns per-layer timing off). On a GPU "
        "the sampled batch replays a graph with timing events around each layer (microseconds "
        "more); elsewhere an extra eager pass follows it.",
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer token required on inference endpoints (unset: no auth)."
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="Log level of the service and of uvicorn."
    )
    slow_request_ms: float = Field(
        0.0,
        ge=0,
        description="Log an engine round trip longer than this, split into its parts (to the "
        "engine, queue, wait, batch, back), at most one line a second per worker; 0: never.",
    )
    access_log: bool = Field(
        False,
        description="One log line per request (uvicorn's access log); off by default, since at "
        "thousands of requests a second it costs the workers CPU and floods the log.",
    )
    models_dir: str = Field(
        "",
        description="Comma list of folders searched for manifests before the shipped ones "
        "(a manifest there may add a model or replace a shipped one of the same name).",
    )
    cache_dir: str = Field(
        ".escort-cache", description="Folder for the auto-tuning decisions (autotune.json)."
    )
    cuda_graphs: bool = Field(True, description="Replay batches through CUDA graphs on the GPU.")
    device_mirror: bool = Field(
        True,
        description="On a GPU, keep a device copy of each HTTP worker's image slots (its "
        "ESCORT_WORKER_SLOTS rows, about 74 MiB per worker at the default 128 slots of 224 px "
        "FP32) and copy each row into it as its request reaches the engine, so that a batch "
        "gathers its rows on the device; false: rows cross the bus when their batch launches.",
    )
    preprocess_workers: int = Field(
        0, ge=0, le=256, description="Threads that decode and resize images; 0: one per CPU core."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, longest wait for requests in flight to finish."
    )
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="HTTP worker processes beside the engine core process; 0: all CPU cores "
        "but 4, at least half of them, at most 16.",
    )
    repository_api: bool = Field(
        False,
        description="Allow the model repository API (/v2/repository/..., gRPC's Repository* "
        "calls): index, and load or unload models at run time from the models folders. Off: "
        "those calls get 403. Behind ESCORT_API_KEY when one is set.",
    )
    listener: Literal["auto", "per-worker", "shared"] = Field(
        "auto",
        description="per-worker: each HTTP worker listens on the port itself (SO_REUSEPORT) "
        "and the kernel spreads new connections evenly over them; shared: one listening "
        "socket for all (the first worker to wake takes a burst); auto: per-worker on Linux.",
    )
    worker_slots: int = Field(
        128,
        ge=1,
        le=65536,
        description="Images each HTTP worker can have in flight (shared-memory slots, one "
        "preprocessed image each); beyond it requests get 503.",
    )
    image_decode: Literal["auto", "workers", "engine"] = Field(
        "auto",
        description="Where JPEG photos are decoded: workers (Pillow, in the HTTP worker "
        "processes) or engine (torchvision, batched on the engine's device, nvJPEG on a GPU); "
        "auto: engine when the model runs on a GPU (measured faster there), else workers.",
    )
    engine: Literal["torch", "null"] = Field(
        "torch",
        description="torch runs the models; null answers uniform probabilities without "
        "computing (the HTTP layer's own ceiling).",
    )
    retry_after_s: int = Field(
        1,
        ge=0,
        description="Retry-After seconds sent with 429 and 503 answers (overload, a full "
        "queue, a drain).",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest request line plus headers accepted; beyond it the client gets 431 "
        "and the connection closes.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a client may take to send a request's line and headers, counted "
        "from its first byte; beyond it the client gets 408 and the connection closes.",
    )
    keep_alive_timeout_s: float = Field(
        5.0,
        gt=0,
        description="An idle keep-alive connection (no request begun) is closed after this.",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="Most open client connections across the HTTP workers (each worker takes "
        "its share); beyond it new connections get 503 with Retry-After and are closed.",
    )

    @field_validator("models", "backends", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            # Order matters (the first backend is the default), duplicates do not.
            items = [str(item).strip() for item in value]
            return tuple(dict.fromkeys(item for item in items if item))
        return value

    @field_validator("backend", "precision", "log_level", "device", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("models")
    @classmethod
    def _need_a_model(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one model")
        for name in value:
            if name.endswith(".toml"):
                continue  # a manifest named by its path; it is checked when it loads
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(
                    f"{name!r} is not a model name (letters, digits, . _ -) or a path to a "
                    ".toml manifest"
                )
        return value

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names the models are served under: a manifest path serves as its file name."""
        return tuple(Path(m).stem if m.endswith(".toml") else m for m in self.models)

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        value = tuple(item.lower() for item in value)
        unknown = [item for item in value if item not in BACKEND_NAMES]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; choose from {list(BACKEND_NAMES)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _default_backend_is_loaded(self) -> Settings:
        if self.backends and self.backend not in self.backends:
            if "backend" in self.model_fields_set:
                raise ValueError(
                    f"ESCORT_BACKEND={self.backend} is not among ESCORT_BACKENDS="
                    f"{','.join(self.backends)}; add it there or pick one of those"
                )
            # Only the list was given: its first entry is the default.
            object.__setattr__(self, "backend", self.backends[0])
        return self

    @property
    def preprocess_threads(self) -> int:
        """The preprocessing pool size, with 0 resolved to the number of CPU cores."""
        return self.preprocess_workers or min(32, os.cpu_count() or 1)

    @property
    def worker_processes(self) -> int:
        """ESCORT_WORKERS, or with 0 `default_worker_count` of the usable cores."""
        if self.workers:
            return self.workers
        return default_worker_count(_usable_cores())

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.grpc and self.grpc_port == self.port:
            raise ValueError(
                f"ESCORT_GRPC_PORT and ESCORT_PORT are both {self.port}; give gRPC its own port "
                "or set ESCORT_GRPC=false"
            )
        return self

    @property
    def per_worker_listeners(self) -> bool:
        """ESCORT_LISTENER resolved: per-worker sockets (Linux's SO_REUSEPORT balances them;
        elsewhere it does not, and auto means shared)."""
        if self.listener == "auto":
            return sys.platform == "linux"
        return self.listener == "per-worker"

    @property
    def loaded_backends(self) -> tuple[str, ...]:
        """Backends to keep loaded, the default first."""
        rest = tuple(b for b in self.backends if b != self.backend)
        return (self.backend, *rest)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_VAR, "").strip()
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def _describe_error(error: dict[str, Any], from_file: bool) -> str:
    location = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    reason = error.get("msg", "invalid")
    if error.get("type") == "extra_forbidden":
        where = os.environ.get(CONFIG_FILE_VAR, "the config file") if from_file else "input"
        return f"{location[0] if location else '?'}: unknown setting in {where}"
    if not location:
        return reason.removeprefix("Value error, ")
    name = ENV_PREFIX + location[0].upper()
    given = error.get("input")
    shown = "" if isinstance(given, dict) or location[0] == "api_key" else f" (got {given!r})"
    return f"{name}: {reason.removeprefix('Value error, ')}{shown}"


def flag_name(field: str) -> str:
    """The `escort serve` flag of a setting: max_batch_size -> --max-batch-size."""
    return "--" + field.replace("_", "-")


def load_settings(*, flags: Mapping[str, Any] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment (and ESCORT_CONFIG), raising ConfigError on bad input.

    `overrides` and `flags` (command-line values by setting name) both win over the
    environment and the file: pydantic-settings puts init arguments first. They differ only
    in how an error names them: a bad flag is reported as `--port`, not as ESCORT_PORT, so
    that the message points at what the user typed."""
    flags = dict(flags or {})
    config_file = os.environ.get(CONFIG_FILE_VAR, "").strip()
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"{CONFIG_FILE_VAR}={config_file}: no such file")
    try:
        return Settings(**{**overrides, **flags})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            line = _describe_error(err, bool(config_file))
            field = str((err.get("loc") or ("",))[0])
            if field in flags:
                line = line.replace(ENV_PREFIX + field.upper(), flag_name(field), 1)
            lines.append(line)
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed TOML file
        raise ConfigError(f"{CONFIG_FILE_VAR}={config_file}: {exc}") from None


def unknown_environment_names() -> list[str]:
    """ESCORT_* variables that name no setting: most likely typos, worth a warning."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_FILE_VAR}
    return sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    value = field.default
    if value is None:
        return "(unset)"
    if name == "backends":
        return "(just `ESCORT_BACKEND`)"
    if isinstance(value, tuple):
        return f"`{','.join(value)}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _type_text(name: str) -> str:
    annotation = Settings.model_fields[name].annotation
    if name == "device":
        return "auto|cpu|cuda|cuda:N"
    text = {int: "int", float: "float", str: "str", bool: "bool"}.get(annotation)  # type: ignore[call-overload]
    if text:
        return text
    if name in ("models", "backends"):
        return "comma list"
    if name == "api_key":
        return "secret str"
    args = getattr(annotation, "__args__", ())
    return "|".join(str(arg) for arg in args) if args else str(annotation)


def settings_table_markdown() -> str:
    """The README settings table, generated from the Settings fields."""
    rows = [
        "| Variable | Type | Default | Description |",
        "|---|---|---|---|",
        f"| `{CONFIG_FILE_VAR}` | path | (unset) | Optional TOML file with any of the "
        "settings below (keys in lower case, without the prefix). |",
    ]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        type_text = _type_text(name).replace("|", "\\|")
        rows.append(
            f"| `{ENV_PREFIX}{name.upper()}` | {type_text} | {_default_text(name)} | {description} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_table_markdown())
