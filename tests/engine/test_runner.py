"""Batch buckets: which batch sizes get a CUDA graph (service.engine.runner.batch_buckets)."""

from __future__ import annotations

import pytest

from service.engine.engine import TorchEngine
from service.engine.runner import batch_buckets
from tests.engine.test_engine import _engine


@pytest.mark.parametrize(
    ("max_batch", "step", "want"),
    [
        (32, 0, (1, 2, 4, 8, 16, 32)),
        (32, 8, (1, 2, 4, 8, 16, 24, 32)),
        (32, 4, (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)),
        (20, 8, (1, 2, 4, 8, 16, 20)),  # the max batch always closes the list
        (5, 8, (1, 2, 4, 5)),
        (1, 4, (1,)),
        (48, 0, (1, 2, 4, 8, 16, 32, 48)),
        (6, 3, (1, 2, 3, 6)),  # powers of two up to the step, then its multiples
    ],
)
def test_buckets(max_batch: int, step: int, want: tuple[int, ...]) -> None:
    assert batch_buckets(max_batch, step) == want


@pytest.mark.parametrize("max_batch", [1, 7, 32, 100])
@pytest.mark.parametrize("step", [0, 1, 3, 4, 8, 64])
def test_every_batch_size_has_a_bucket_that_wastes_less_than_a_step(max_batch, step) -> None:
    buckets = batch_buckets(max_batch, step)
    assert list(buckets) == sorted(set(buckets)) and buckets[-1] == max_batch
    for n in range(1, max_batch + 1):
        fit = min(b for b in buckets if b >= n)
        # Below the step, powers of two (at most half padding); above, less than one step.
        assert fit - n < max(step, 1) or fit < 2 * n, (n, fit, buckets)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        batch_buckets(0)
    with pytest.raises(ValueError, match="step"):
        batch_buckets(8, -1)


def test_the_engine_takes_its_step_from_the_spec(tmp_path) -> None:
    engine: TorchEngine = _engine(tmp_path, ("dense",), max_batch_size=12, batch_bucket_step=4)
    try:
        assert engine.buckets == (1, 2, 4, 8, 12)
    finally:
        engine.close()
