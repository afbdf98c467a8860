"""ServiceState: where photos are decoded (ESCORT_IMAGE_DECODE: auto, workers, engine)."""

from __future__ import annotations

import logging
import re
import time
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


def test_a_slow_round_trip_is_logged_with_its_parts(caplog) -> None:
    from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
    from tests.service.servers import ThreadServer
    from tests.v2_bodies import tensor_body

    url = f"/v2/models/{FAKE_MODEL}/infer"
    caplog.set_level(logging.WARNING, logger="escort.app")
    slow = ThreadServer(FakeEngine(delay_s=0.03), slow_request_ms=20)
    with slow as server, server.client() as http:
        started = time.monotonic()
        for i in range(4):
            assert http.post(url, json=tensor_body(marked_tensor(i / 10))).status_code == 200
        seconds = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if "slow request" in r.getMessage()]
    assert 1 <= len(lines) <= int(seconds) + 1, lines  # every request was slow; one line a second
    parts = re.search(
        r"round trip ([\d.]+) ms = to engine ([\d.]+) \+ queue ([\d.]+) \+ wait ([\d.]+) \+ "
        r"batch ([\d.]+) \+ back ([\d.]+)",
        lines[0],
    )
    assert parts is not None, lines[0]
    whole, *pieces = (float(x) for x in parts.groups())
    assert pieces[3] >= 30 and whole >= 30  # the 30 ms batch
    assert sum(pieces) == pytest.approx(whole, abs=0.5)


def test_no_slow_log_by_default(caplog) -> None:
    from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
    from tests.service.servers import ThreadServer
    from tests.v2_bodies import tensor_body

    caplog.set_level(logging.WARNING, logger="escort.app")
    with ThreadServer(FakeEngine(delay_s=0.03)) as server, server.client() as http:
        body = tensor_body(marked_tensor(0.1))
        assert http.post(f"/v2/models/{FAKE_MODEL}/infer", json=body).status_code == 200
    assert not [r for r in caplog.records if "slow request" in r.getMessage()]
