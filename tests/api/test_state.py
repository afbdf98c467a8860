"""ServiceState: where photos are decoded (ESCORT_IMAGE_DECODE: auto, workers, engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.state import ServiceState
from service.engine.protocol import ModelDescription, Preprocessing
from service.metrics import ServiceMetrics
from service.preprocess import Preprocessor
from tests.service.servers import make_settings

PHOTO = (Path(__file__).resolve().parents[1] / "data" / "cat.jpg").read_bytes()


class _Dispatcher:
    def row_capacity(self) -> int:
        return 1 << 20


def _model(device: str, decodes: bool = True) -> ModelDescription:
    prep = Preprocessing(resize=256, crop=224, mean=(0.0,) * 3, std=(1.0,) * 3)
    return ModelDescription("m", "resnet50", ("a",), prep, ("dense",), 8, device, "fp32",
                            decodes_images=decodes)  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "device", "decodes", "in_engine"),
    [
        ("auto", "cuda:0", True, True),  # a GPU: nvJPEG in the engine, measured faster
        ("auto", "cpu", True, False),  # a CPU: the workers share the decode
        ("engine", "cpu", True, True),  # asked for
        ("workers", "cuda:0", True, False),  # asked for
        ("engine", "cuda:0", False, False),  # an engine that cannot decode
        ("auto", "cuda:0", False, False),
    ],
)
def test_where_photos_are_decoded(mode, device, decodes, in_engine) -> None:
    settings = make_settings(image_decode=mode)
    state = ServiceState(settings, ServiceMetrics(8), Preprocessor(1, 10**7), ("m",))
    model = _model(device, decodes)
    assert state._decode_in_engine(model, _Dispatcher(), [PHOTO]) is in_engine


def test_auto_is_the_default() -> None:
    assert make_settings().image_decode == "auto"
