"""`escort serve`'s flags (parsing, precedence over the environment and the file, errors) and
the output of a real server: flags reaching the spawned processes, a timestamp on every line,
no progress-bar escapes in a log file, one line for a configuration mistake."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import service.app
from service.cli import SERVE_FLAGS, parse_serve_args
from service.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
CAT = REPO / "tests" / "data" / "cat.jpg"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")
READY_TIMEOUT_S = 180.0


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ESCORT_"):
            monkeypatch.delenv(name)


# --- parsing -------------------------------------------------------------------------------


def test_every_flag_becomes_a_setting() -> None:
    args = parse_serve_args(
        [
            "--host=0.0.0.0",
            "--port",
            "9100",
            "--models",
            "a-net,b-net",
            "--backend",
            "sparse",
            "--backends",
            "sparse,dense",
            "--device",
            "cpu",
            "--precision",
            "fp16",
            "--workers",
            "3",
            "--config",
            "escort.toml",
        ]
    )
    assert args.config == "escort.toml"
    assert set(args.settings) == set(SERVE_FLAGS)
    settings = load_settings(flags=args.settings)
    assert (settings.host, settings.port, settings.workers) == ("0.0.0.0", 9100, 3)
    assert settings.models == ("a-net", "b-net")
    assert settings.loaded_backends == ("sparse", "dense")
    assert (settings.device, settings.precision) == ("cpu", "fp16")


def test_flags_left_out_set_nothing() -> None:
    args = parse_serve_args([])
    assert args.settings == {} and args.config is None


def test_every_flag_names_a_setting() -> None:
    for name in SERVE_FLAGS:
        assert name in Settings.model_fields


@pytest.mark.parametrize("argv", [["--frobnicate"], ["--po", "9000"], ["9000"]])
def test_unknown_flags_are_usage_errors_that_list_the_known_ones(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # --po: no abbreviations, so a typo cannot silently mean another flag.
    with pytest.raises(SystemExit) as stop:
        parse_serve_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "known flags:" in err
    for name in ("--config", "--host", "--port", "--models", "--workers"):
        assert name in err


def test_help_lists_the_flags_and_points_at_the_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert service.app.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in (*SERVE_FLAGS, "config"):
        assert f"--{name}" in out
    assert "ESCORT_PORT" in out and "ESCORT_CONFIG" in out
    assert "python -m service.config" in out


# --- precedence: main() with run_service replaced, so nothing is served ------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The Settings main() would serve (and pickle to the children)."""
    captured: list[Settings] = []

    def fake_run_service(settings: Settings) -> int:
        captured.append(settings)
        return 0

    monkeypatch.setattr("service.core.supervisor.run_service", fake_run_service)
    # main() puts --config into os.environ; recorded here so that monkeypatch takes it out.
    monkeypatch.setenv("ESCORT_CONFIG", "")
    # main() configures the process's logging; here that would take pytest's handlers away.
    monkeypatch.setattr(service.app, "configure", lambda role, level: None)
    return captured


def test_flags_win_over_the_environment_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: list[Settings]
) -> None:
    toml = tmp_path / "escort.toml"
    toml.write_text('port = 8200\nmax_batch_size = 8\nprecision = "tf32"\n')
    monkeypatch.setenv("ESCORT_PORT", "8300")
    monkeypatch.setenv("ESCORT_DEVICE", "cuda")
    argv = ["--config", str(toml), "--port", "8400", "--device", "cpu"]
    assert service.app.main(argv) == 0
    (settings,) = served
    assert settings.port == 8400 and settings.device == "cpu"  # flag over env over file
    assert settings.max_batch_size == 8 and settings.precision == "tf32"  # from --config


def test_config_flag_wins_over_escort_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: list[Settings]
) -> None:
    (tmp_path / "env.toml").write_text("max_batch_size = 4\n")
    (tmp_path / "flag.toml").write_text("max_batch_size = 16\n")
    monkeypatch.setenv("ESCORT_CONFIG", str(tmp_path / "env.toml"))
    assert service.app.main(["--config", str(tmp_path / "flag.toml")]) == 0
    assert served[0].max_batch_size == 16


def test_a_bad_flag_value_names_the_flag(
    served: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert service.app.main(["--port", "http", "--backend", "fast"]) == 2
    err = capsys.readouterr().err
    assert "--port:" in err and "--backend:" in err
    assert "ESCORT_PORT" not in err  # the user typed a flag, not a variable
    assert not served


def test_a_missing_config_file_is_a_usage_error(
    tmp_path: Path, served: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert service.app.main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "--config" in capsys.readouterr().err and not served


def test_unknown_flag_through_the_escort_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--prot", "9000"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--prot" in proc.stderr and "known flags:" in proc.stderr and "--port" in proc.stderr


# --- a real server: `python -m service.app <flags>` in a process of its own ---------------


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCORT_")}
    env["ESCORT_GRPC"] = "false"  # these servers are about flags; gRPC has tests/api/test_grpc.py
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2)
    except httpx.TransportError:
        return False
    return True


@dataclass
class Run:
    port: int
    env_port: int
    classify: httpx.Response
    model: dict
    env_port_answered: bool
    exit_code: int
    output: str


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One real server for the tests below: started with flags (ESCORT_PORT says otherwise),
    asked once, then stopped with SIGTERM. Its stdout and stderr go to a file, as in a
    container, so no terminal is involved."""
    port, env_port = _free_port(), _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "output.log"
    argv = ["--port", str(port), "--models", "efficientnet-lite0", "--device", "cpu"]
    argv += ["--backend", "dense", "--workers", "1"]
    # ESCORT_PORT and ESCORT_DEVICE are overridden by flags; the access log is off by default.
    env = _env(ESCORT_PORT=str(env_port), ESCORT_DEVICE="cuda", ESCORT_ACCESS_LOG="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.app", *argv],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                while True:
                    assert proc.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, "not ready:\n" + log_path.read_text()
                    with contextlib.suppress(httpx.TransportError):
                        if http.get("/v2/health/ready").status_code == 200:
                            break
                    time.sleep(0.2)
                classify = http.post(
                    "/v1/models/efficientnet-lite0/classify",
                    files={"image": ("cat.jpg", CAT.read_bytes(), "image/jpeg")},
                )
                model = http.get("/v2/models/efficientnet-lite0").json()
            env_port_answered = _answers(env_port)
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    yield Run(
        port,
        env_port,
        classify,
        model,
        env_port_answered,
        exit_code,
        log_path.read_bytes().decode(errors="replace"),
    )


@pytest.mark.slow
def test_flags_reach_every_process(real_run: Run) -> None:
    # The supervisor listens on --port, not on ESCORT_PORT; the engine process got --device
    # cpu over ESCORT_DEVICE=cuda (else it would have failed) and --backend dense; the
    # worker count came from --workers.
    assert real_run.classify.status_code == 200, real_run.output
    assert real_run.classify.json()["backend"] == "dense"
    assert real_run.model["parameters"]["backends"] == ["dense"]
    assert not real_run.env_port_answered
    assert f"serving on http://127.0.0.1:{real_run.port} with 1 HTTP worker(s)" in real_run.output
    assert real_run.exit_code == 0, real_run.output


@pytest.mark.slow
def test_every_line_has_a_timestamp_and_a_role(real_run: Run) -> None:
    lines = [line for line in real_run.output.splitlines() if line.strip()]
    untimed = [line for line in lines if not TIMESTAMP.match(line)]
    assert not untimed, "lines without a timestamp:\n" + "\n".join(untimed)
    # One format for every process, uvicorn's own and its access lines included.
    assert any(" [supervisor] escort.supervisor: serving on" in line for line in lines)
    assert any(" [engine] " in line for line in lines)
    assert any(" [worker 0] uvicorn: Started server process" in line for line in lines)
    assert any(
        " [worker 0] uvicorn.access: " in line and "POST /v1/models/efficientnet-lite0" in line
        for line in lines
    )


@pytest.mark.slow
def test_no_progress_bar_escapes_in_a_log_file(real_run: Run) -> None:
    assert "\x1b[" not in real_run.output and "\r" not in real_run.output
    # The load still shows its progress, one line per step.
    assert re.search(r"INFO \[engine\] \S+: loading models \d+/\d+: ", real_run.output)


@pytest.mark.slow
def test_cuda_without_a_gpu_is_one_line_and_exit_1() -> None:
    port = _free_port()
    # CUDA_VISIBLE_DEVICES="": no GPU for torch even where there is one.
    env = _env(ESCORT_DEVICE="cuda", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "service.app", "--port", str(port), "--workers", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    output = proc.stdout.decode(errors="replace")
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    naming = [line for line in output.splitlines() if " ERROR " in line and "'cuda'" in line]
    assert len(naming) == 1, output
    assert "torch sees no CUDA GPU" in naming[0] and "ESCORT_DEVICE=cpu" in naming[0]
