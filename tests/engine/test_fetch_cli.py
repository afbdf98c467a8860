import pytest

from service.engine import fetch_cli


def test_fetch_models_loads_the_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert fetch_cli.main(["--models", "efficientnet-lite0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("efficientnet-lite0: 4.")  # 4.6M parameters
    assert "conv sparsity" in out


def test_fetch_models_names_the_model_that_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert fetch_cli.main(["--models", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err
