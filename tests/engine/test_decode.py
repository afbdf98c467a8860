"""The engine's own photo decode (ESCORT_IMAGE_DECODE=engine) against the workers' Pillow path,
and a runner batch that mixes encoded photos with preprocessed rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.decode import decode_rows, is_encoded
from service.engine.protocol import Preprocessing
from service.preprocess import preprocess_image

DATA = Path(__file__).resolve().parents[1] / "data"
SPEC = Preprocessing(resize=256, crop=224, mean=(127.0, 127.0, 127.0), std=(128.0,) * 3)


def _bytes(name: str) -> np.ndarray:
    return np.frombuffer((DATA / name).read_bytes(), dtype=np.uint8)


@pytest.mark.parametrize("name", ["cat.jpg", "coffee.jpg", "rocket.jpg"])
def test_engine_decode_matches_the_pillow_path(name: str) -> None:
    prepared, failed = decode_rows([_bytes(name)], SPEC, torch.device("cpu"))
    assert failed == [] and prepared[0] is not None
    got = prepared[0].numpy()
    want = preprocess_image((DATA / name).read_bytes(), SPEC, 50_000_000)
    assert got.shape == want.shape == (3, 224, 224)
    # Same geometry and normalization; the resamplers differ (Pillow may also decode at a
    # reduced DCT scale), so values agree closely on average, not bit for bit.
    assert float(np.abs(got - want).mean()) < 0.03
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_a_photo_that_does_not_decode_is_reported_by_index() -> None:
    good = _bytes("cat.jpg")
    truncated = good[: len(good) // 2].copy()
    prepared, failed = decode_rows([good, truncated, good], SPEC, torch.device("cpu"))
    assert failed == [1]
    assert prepared[1] is None and prepared[0] is not None and prepared[2] is not None
    torch.testing.assert_close(prepared[0], prepared[2])


def test_a_mixed_batch_equals_each_photo_alone() -> None:
    """Photos of one size are resized together; the result must not depend on the company."""
    names = ["cat.jpg", "coffee.jpg", "cat.jpg", "rocket.jpg", "coffee.jpg"]
    together, failed = decode_rows([_bytes(n) for n in names], SPEC, torch.device("cpu"))
    assert failed == []
    for name, got in zip(names, together, strict=True):
        alone = decode_rows([_bytes(name)], SPEC, torch.device("cpu"))[0][0]
        assert got is not None and alone is not None and got.shape == (3, 224, 224)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
    assert not torch.equal(together[0], together[1])  # different photos stay different


def test_only_1d_uint8_rows_are_encoded() -> None:
    assert is_encoded(_bytes("cat.jpg"))
    assert not is_encoded(np.zeros((3, 4, 4), np.float32))
    assert not is_encoded(np.zeros((3, 4, 4), np.uint8))


def test_a_runner_batch_mixes_photos_and_tensors() -> None:
    from service.engine.assemble import build_backend
    from service.engine.build import prepare_model
    from service.engine.runner import Runner
    from tests.engine.conftest import magnitude_prune

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    magnitude_prune(net, 0.5)
    small = Preprocessing(resize=40, crop=32, mean=(127.0,) * 3, std=(128.0,) * 3)
    prepared = prepare_model(net, (3, 32, 32))
    built = build_backend(prepared, "sparse", torch.device("cpu"), "fp32")
    runner = Runner(
        built, model_name="t", input_shape=(3, 32, 32), max_batch_size=4, preprocessing=small
    )
    runner.warm()
    photo = _bytes("coffee.jpg")
    tensor = np.random.default_rng(1).normal(size=(3, 32, 32)).astype(np.float32)
    decoded = decode_rows([photo], small, torch.device("cpu"))[0][0].numpy()
    mixed = runner.infer_rows([photo, tensor, photo[:500].copy()])
    alone = runner.infer(np.stack([decoded, tensor]))
    np.testing.assert_allclose(mixed[:2], alone, rtol=1e-5, atol=1e-6)
    assert np.isnan(mixed[2]).all()  # the broken photo answers NaN, the others are unharmed


def test_the_decode_bench_times_every_path(tmp_path) -> None:
    from bench import decode_bench

    assert (
        decode_bench.main(
            ["--device", "cpu", "--batch", "3", "--reps", "1", "--out", str(tmp_path)]
        )
        == 0
    )
    record = json.loads((tmp_path / "decode.json").read_text())
    assert record["batch"] == 3 and len(record["results"]) == 4
    assert all(r["ms_per_batch"] > 0 for r in record["results"].values())
    assert "| decode_rows (grouped by size) |" in (tmp_path / "decode.md").read_text()
