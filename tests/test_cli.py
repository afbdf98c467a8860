import subprocess
import sys

import pytest

from service import cli


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("serve", "prune", "bench"):
        assert name in out


def test_unknown_command_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "frobnicate"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_unknown_bench_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "nothing"], capture_output=True, text=True
    )
    assert proc.returncode == 2


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"escort {metadata.version('escort-serve')}"


def test_version_without_an_installed_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from importlib import metadata

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", missing)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "escort 0.0.0"


def test_help_mentions_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "--version" in capsys.readouterr().out


def test_serve_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: escort serve")
    for flag in ("--host", "--port", "--models", "--backend", "--backends", "--device"):
        assert flag in out
    for flag in ("--precision", "--config", "--workers"):
        assert flag in out
    assert "ESCORT_*" in out and "python -m service.config" in out


def test_bench_layers_outside_a_checkout_says_where_it_lives(tmp_path) -> None:
    """An installed package has service/ but not the checkout's bench/: a clear error, exit 2."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "service").symlink_to(root / "service")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "layers", "--help"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "bench/ folder" in result.stderr and "Traceback" not in result.stderr
