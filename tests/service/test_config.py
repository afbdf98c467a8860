"""Settings: defaults, parsing, the config file, errors that name the setting, the README table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.app import engine_spec
from service.config import ConfigError, Settings, load_settings, settings_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"
CONTRACT_NAMES = [
    "HOST",
    "PORT",
    "MODELS",
    "BACKEND",
    "BACKENDS",
    "DEVICE",
    "PRECISION",
    "MAX_BATCH_SIZE",
    "MAX_BATCH_DELAY_MS",
    "MAX_QUEUE_SIZE",
    "REQUEST_TIMEOUT_S",
    "MAX_REQUEST_BYTES",
    "MAX_IMAGE_PIXELS",
    "LAYER_PROFILE_EVERY",
    "API_KEY",
    "LOG_LEVEL",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ESCORT_"):
            monkeypatch.delenv(name)


def test_defaults_follow_the_contract() -> None:
    settings = load_settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.models == ("efficientnet-lite0",)
    assert settings.backend == "auto" and settings.loaded_backends == ("auto",)
    assert settings.device == "auto" and settings.precision == "fp32"
    assert settings.api_key is None


def test_every_contract_name_is_a_setting() -> None:
    for name in CONTRACT_NAMES:
        assert name.lower() in Settings.model_fields, name
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_environment_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_MODELS", " a-net, b.net ,a-net")
    monkeypatch.setenv("ESCORT_BACKENDS", "sparse,DENSE")
    monkeypatch.setenv("ESCORT_PORT", "9001")
    monkeypatch.setenv("ESCORT_DEVICE", "cuda:1")
    monkeypatch.setenv("ESCORT_API_KEY", "s3cret")
    monkeypatch.setenv("ESCORT_LOG_LEVEL", "WARNING")
    settings = load_settings()
    assert settings.models == ("a-net", "b.net")
    # Only the list was given, so its first entry is the default backend.
    assert settings.backend == "sparse" and settings.loaded_backends == ("sparse", "dense")
    assert settings.port == 9001 and settings.device == "cuda:1"
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.log_level == "warning"
    spec = engine_spec(settings)
    assert spec.models == ("a-net", "b.net") and spec.backends == ("sparse", "dense")
    assert spec.device == "cuda:1" and spec.device_mirror
    monkeypatch.setenv("ESCORT_DEVICE_MIRROR", "false")
    assert not engine_spec(load_settings()).device_mirror


def test_explicit_default_backend_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_BACKEND", "dense")
    monkeypatch.setenv("ESCORT_BACKENDS", "sparse,dense")
    assert load_settings().loaded_backends == ("dense", "sparse")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ESCORT_PORT", "99999", "ESCORT_PORT"),
        ("ESCORT_PORT", "http", "ESCORT_PORT"),
        ("ESCORT_BACKEND", "fast", "ESCORT_BACKEND"),
        ("ESCORT_BACKENDS", "sparse,turbo", "ESCORT_BACKENDS"),
        ("ESCORT_DEVICE", "gpu", "ESCORT_DEVICE"),
        ("ESCORT_PRECISION", "int8", "ESCORT_PRECISION"),
        ("ESCORT_MAX_BATCH_SIZE", "0", "ESCORT_MAX_BATCH_SIZE"),
        ("ESCORT_MAX_BATCH_DELAY_MS", "-1", "ESCORT_MAX_BATCH_DELAY_MS"),
        ("ESCORT_REQUEST_TIMEOUT_S", "0", "ESCORT_REQUEST_TIMEOUT_S"),
        ("ESCORT_MODELS", " , ", "ESCORT_MODELS"),
        ("ESCORT_MODELS", "../etc/passwd", "ESCORT_MODELS"),
        ("ESCORT_LAYER_PROFILE_EVERY", "-5", "ESCORT_LAYER_PROFILE_EVERY"),
    ],
)
def test_invalid_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert expected in str(err.value)


def test_default_backend_missing_from_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_BACKEND", "auto")
    monkeypatch.setenv("ESCORT_BACKENDS", "sparse,dense")
    with pytest.raises(ConfigError, match="ESCORT_BACKEND=auto is not among ESCORT_BACKENDS"):
        load_settings()


def test_toml_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "escort.toml"
    path.write_text('port = 8123\nmodels = ["x-net", "y-net"]\nmax_batch_size = 8\n')
    monkeypatch.setenv("ESCORT_CONFIG", str(path))
    monkeypatch.setenv("ESCORT_MAX_BATCH_SIZE", "16")  # the environment wins over the file
    settings = load_settings()
    assert settings.port == 8123 and settings.models == ("x-net", "y-net")
    assert settings.max_batch_size == 16


def test_bad_config_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()
    typo = tmp_path / "typo.toml"
    typo.write_text("max_batch = 8\n")
    monkeypatch.setenv("ESCORT_CONFIG", str(typo))
    with pytest.raises(ConfigError, match="max_batch: unknown setting"):
        load_settings()
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1\n")
    monkeypatch.setenv("ESCORT_CONFIG", str(broken))
    with pytest.raises(ConfigError, match="ESCORT_CONFIG"):
        load_settings()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("port = 0\n")
    monkeypatch.setenv("ESCORT_CONFIG", str(wrong))
    with pytest.raises(ConfigError, match="ESCORT_PORT"):
        load_settings()


def test_main_exits_2_on_bad_settings(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from service.app import main

    monkeypatch.setenv("ESCORT_MAX_QUEUE_SIZE", "none")
    assert main([]) == 2
    assert "ESCORT_MAX_QUEUE_SIZE" in capsys.readouterr().err


def test_table_lists_every_setting() -> None:
    table = settings_table_markdown()
    for name in Settings.model_fields:
        assert f"`ESCORT_{name.upper()}`" in table
    assert "`ESCORT_CONFIG`" in table


def test_readme_settings_table_matches_the_settings() -> None:
    """README.md carries the generated table; regenerate it with `python -m service.config`."""
    text = README.read_text()
    rows = [line for line in text.splitlines() if re.match(r"^\| `ESCORT_[A-Z_]+` \|", line)]
    expected = [line for line in settings_table_markdown().splitlines() if "`ESCORT_" in line]
    assert rows == expected, (
        "README.md's settings table is out of date: paste the output of "
        "`python -m service.config` into it"
    )


def test_unknown_escort_variables_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import unknown_environment_names

    monkeypatch.setenv("ESCORT_MAX_BATCH", "8")  # a typo of ESCORT_MAX_BATCH_SIZE
    monkeypatch.setenv("ESCORT_PORT", "8005")
    assert unknown_environment_names() == ["ESCORT_MAX_BATCH"]
    assert load_settings().max_batch_size == 32


def test_preprocess_workers_zero_means_one_per_core() -> None:
    import os

    assert load_settings().preprocess_threads == min(32, os.cpu_count() or 1)
    assert load_settings(preprocess_workers=3).preprocess_threads == 3


def test_default_worker_count_leaves_the_engine_its_cores() -> None:
    from service.config import default_worker_count

    assert [default_worker_count(c) for c in (1, 2, 4, 8, 16, 32)] == [1, 1, 2, 4, 12, 16]
    assert Settings(workers=3).worker_processes == 3  # a set value always wins
