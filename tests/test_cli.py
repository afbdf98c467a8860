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
