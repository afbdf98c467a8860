"""LOADTEST_* settings through pydantic-settings: typos warned about by name, bad values exit 2
naming the setting (both through `python -m loadtest.run`), the docs table generated."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from loadtest.config import (
    LoadtestConfigError,
    LoadtestSettings,
    load_config,
    load_settings,
    settings_table_markdown,
    unknown_setting_warnings,
)
from tests.ops.conftest import ROOT, Server, free_port, run_loadtest

DOC = ROOT / "docs" / "operations.md"
# Every name the load test read before it moved to pydantic-settings, plus loadtest.scaling's.
NAMES = [
    "URL",
    "DURATION_S",
    "OUT",
    "MODEL",
    "USERS",
    "THINK_MS",
    "BACKENDS",
    "COMPARE",
    "PROTOCOLS",
    "V2_INPUT",
    "IMAGES_PER_REQUEST",
    "IMAGE_SIDES",
    "IMAGES",
    "MAX_REQUESTS",
    "SETTLE_S",
    "DRIVER",
    "WRK",
    "SINK",
    "CEILING_URL",
    "LAYER_BENCH",
    "TIMEOUT_S",
    "READY_TIMEOUT_S",
    "PROCESSES",
    "METRICS_URLS",
    "API_KEY",
    "SEED",
    "PLOT_LAYERS",
    "GPUS",
    "SCALING_MODE",
    "BASE_PORT",
    "SERVER_CMD",
]


def test_every_existing_name_is_a_described_setting() -> None:
    assert sorted(name.upper() for name in LoadtestSettings.model_fields) == sorted(NAMES)
    for name, field in LoadtestSettings.model_fields.items():
        assert field.description and "\n" not in field.description, name


def test_unset_blank_and_given_values() -> None:
    blank = {f"LOADTEST_{name}": "  " for name in NAMES}  # blank means the default, as before
    assert load_config(blank) == load_config({})
    config = load_config({"LOADTEST_PROCESSES": "3", "LOADTEST_SINK": "yes",
                          "LOADTEST_DRIVER": " WRK ", "LOADTEST_API_KEY": "s3cret"})  # fmt: skip
    assert (config.processes, config.wrk_threads, config.sink, config.driver) == (3, 3, True, "wrk")
    assert config.api_key == "s3cret" and config.public()["api_key"] == "set"
    typed = load_settings({"LOADTEST_GPUS": "4", "LOADTEST_SCALING_MODE": "One-Process"})
    assert (typed.gpus, typed.scaling_mode, typed.base_port) == (4, "one-process", 8001)


@pytest.mark.parametrize(
    ("env", "words"),
    [({"LOADTEST_PLOT_LAYERS": "0"}, "greater than or equal to 1"),
     ({"LOADTEST_GPUS": "1"}, "greater than or equal to 2"),
     ({"LOADTEST_DRIVER": "ab"}, "'locust' or 'wrk'"),
     ({"LOADTEST_SETTLE_S": "-1"}, "greater than or equal to 0"),
     ({"LOADTEST_API_KEY": "k", "LOADTEST_SEED": "-2"}, "LOADTEST_SEED")],
)  # fmt: skip
def test_bad_values_name_the_setting(env: dict[str, str], words: str) -> None:
    with pytest.raises(LoadtestConfigError) as caught:
        load_config(env)
    assert re.search(rf"\b{list(env)[-1]}: ", str(caught.value)) and words in str(caught.value)
    assert "'k'" not in str(caught.value)  # the API key's value never shows


def test_typo_warning_names_the_variable_and_the_setting_meant(standin: Server, tmp_path) -> None:
    env = {"LOADTEST_URL": standin.url, "LOADTEST_DURATION": "20", "LOADTEST_DURATION_S": "2",
           "LOADTEST_USERS": "1", "LOADTEST_SETTLE_S": "0", "LOADTEST_QWERTY": "1",
           "LOADTEST_OUT": str(tmp_path)}  # fmt: skip
    result = run_loadtest(env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert ("loadtest: warning: LOADTEST_DURATION is not a setting and is ignored; did you mean "
            "LOADTEST_DURATION_S?") in lines  # fmt: skip
    assert "loadtest: warning: LOADTEST_QWERTY is not a setting and is ignored" in lines
    assert not any("LOADTEST_DURATION_S is not" in line for line in lines)


def test_bad_value_exits_2_naming_the_setting(tmp_path) -> None:
    # Nothing listens on the port: the run must stop on the setting before it waits for a server.
    url = f"http://127.0.0.1:{free_port()}"
    for name, value in (("LOADTEST_USERS", "1,many"), ("LOADTEST_V2_INPUT", "jpeg"),
                        ("LOADTEST_COMPARE", "perhaps")):  # fmt: skip
        result = run_loadtest({"LOADTEST_URL": url, name: value, "LOADTEST_OUT": str(tmp_path)})
        assert result.returncode == 2, (name, result.stderr)
        assert f"{name}: " in result.stderr and repr(value.split(",")[-1]) in result.stderr
        assert "not ready" not in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_scaling_reads_the_same_settings(tmp_path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    env = {**clean, "LOADTEST_GPUS": "1", "LOADTEST_OUT": str(tmp_path), "LOADTEST_GPU": "2"}
    result = subprocess.run([sys.executable, "-m", "loadtest.scaling"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "LOADTEST_GPUS: " in result.stderr, result.stderr
    assert "LOADTEST_GPU is not a setting and is ignored; did you mean LOADTEST_GPUS?" in (
        result.stderr
    )


def test_warnings_only_for_loadtest_names() -> None:
    env = {"LOADTEST_USER": "4", "LOADTEST_USERS": "4", "ESCORT_PORTT": "1", "LOADTESTX": "1"}
    assert unknown_setting_warnings(env) == [
        "LOADTEST_USER is not a setting and is ignored; did you mean LOADTEST_USERS?"
    ]


def test_docs_table_matches_the_settings() -> None:
    """docs/operations.md carries the generated table; regenerate it with
    `python -m loadtest.config`."""
    rows = [line for line in DOC.read_text().splitlines()
            if re.match(r"^\| `LOADTEST_[A-Z0-9_]+` \|", line)]  # fmt: skip
    expected = [line for line in settings_table_markdown().splitlines() if "`LOADTEST_" in line]
    assert rows == expected, (
        "docs/operations.md's load test settings table is out of date: paste the output of "
        "`python -m loadtest.config` into it"
    )
    printed = subprocess.run([sys.executable, "-m", "loadtest.config"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert printed.returncode == 0 and printed.stdout == settings_table_markdown()


def test_think_time_is_one_value_or_one_per_step_and_needs_wrk() -> None:
    config = load_config({"LOADTEST_USERS": "2,4,8", "LOADTEST_THINK_MS": "0,0,100",
                          "LOADTEST_DRIVER": "wrk"})  # fmt: skip
    assert [config.think_for(i) for i in range(3)] == [0, 0, 100]  # repeats are kept
    one = load_config(
        {"LOADTEST_USERS": "2,4", "LOADTEST_THINK_MS": "50", "LOADTEST_DRIVER": "wrk"}
    )
    assert [one.think_for(i) for i in range(2)] == [50, 50]
    for env in ({"LOADTEST_USERS": "2,4", "LOADTEST_THINK_MS": "1,2,3", "LOADTEST_DRIVER": "wrk"},
                {"LOADTEST_THINK_MS": "-5", "LOADTEST_DRIVER": "wrk"},
                {"LOADTEST_THINK_MS": "100"}):  # fmt: skip
        with pytest.raises(LoadtestConfigError, match="think_ms"):
            load_config(env)
