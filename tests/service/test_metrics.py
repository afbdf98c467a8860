"""/metrics: every contract name, sensible histograms, and a clean `promtool check metrics`."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ServiceMetrics, batch_size_buckets
from tests.service.fakes import FAKE_MODEL

CONTRACT = {
    "escort_requests": ("counter", {"model", "backend", "protocol", "code"}),
    "escort_request_duration_seconds": ("histogram", {"model", "backend"}),
    "escort_queue_duration_seconds": ("histogram", {"model"}),
    "escort_preprocess_duration_seconds": ("histogram", {"model"}),
    "escort_compute_duration_seconds": ("histogram", {"model", "backend"}),
    "escort_batch_size": ("histogram", {"model", "backend"}),
    "escort_queue_depth": ("gauge", {"model"}),
    "escort_rejected": ("counter", {"model", "reason"}),
    "escort_layer_duration_seconds": ("histogram", {"model", "backend", "layer", "op"}),
    "escort_layer_sparsity": ("gauge", {"model", "layer"}),
    "escort_model_ready": ("gauge", {"model"}),
}


def traffic(client: TestClient, photos: dict[str, bytes]) -> str:
    tensor = np.zeros((2, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [2, 3, 32, 32],
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ]
    }
    assert client.post(f"/v2/models/{FAKE_MODEL}/infer", json=body).status_code == 200
    files = {"image": ("cat.jpg", photos["cat.jpg"])}
    assert client.post(f"/v1/models/{FAKE_MODEL}/classify", files=files).status_code == 200
    assert (
        client.post(f"/v1/models/{FAKE_MODEL}/classify?backend=x", files=files).status_code == 400
    )
    assert client.post("/v1/models/attacker-chosen/classify", files=files).status_code == 404
    client.app.state.service.metrics.observe_layer(
        FAKE_MODEL, "sparse", "conv1", "conv3x3", 2e-4, 8
    )
    return client.get("/metrics").text


def test_contract_metrics_are_exported(client: TestClient, photos: dict[str, bytes]) -> None:
    text = traffic(client, photos)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        sample_labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert sample_labels == labels, (name, sample_labels)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    key = (
        "escort_requests_total",
        (("backend", "sparse"), ("code", "200"), ("model", FAKE_MODEL), ("protocol", "v2")),
    )
    assert samples[key] == 1
    # Unknown path segments never become label values.
    assert not any(("model", "attacker-chosen") in labels for _, labels in samples)
    assert any(("model", "unknown") in labels for _, labels in samples)
    assert samples[("escort_layer_sparsity", (("layer", "conv2"), ("model", FAKE_MODEL)))] == 0.9
    assert samples[("escort_batch_size_sum", (("backend", "sparse"), ("model", FAKE_MODEL)))] == 3


def test_promtool_finds_nothing_to_complain_about(
    client: TestClient, photos: dict[str, bytes]
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        import pytest

        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    text = traffic(client, photos)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert not result.stdout.strip() and not result.stderr.strip()


def test_batch_size_buckets_are_powers_of_two() -> None:
    assert batch_size_buckets(1) == (1.0,)
    assert batch_size_buckets(32) == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    assert batch_size_buckets(48) == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def test_device_memory_from_the_engine() -> None:
    metrics = ServiceMetrics()
    metrics.record_memory({"cuda:0": {"allocated": 1024.0, "total": 4096.0}})
    text = metrics.render()[0].decode()
    assert 'escort_device_memory_bytes{device="cuda:0",kind="allocated"} 1024.0' in text
    metrics.record_memory({"cuda:0": {"allocated": 2048.0}})
    text = metrics.render()[0].decode()
    assert 'escort_device_memory_bytes{device="cuda:0",kind="allocated"} 2048.0' in text


def test_apps_have_separate_registries() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    first.requests.labels("m", "b", "v1", "200").inc()
    assert (
        first.registry.get_sample_value(
            "escort_requests_total", {"model": "m", "backend": "b", "protocol": "v1", "code": "200"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "escort_requests_total", {"model": "m", "backend": "b", "protocol": "v1", "code": "200"}
        )
        is None
    )
