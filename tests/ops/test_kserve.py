"""deploy/kserve/: each manifest against KServe's own CRD schema (tests/data/kserve/), with no
field that Kubernetes would prune, and the container's command, arguments and environment
as the service itself parses them."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.cli import parse_serve_args
from service.config import ENV_PREFIX, Settings, load_settings
from service.core.http_server import FINISH_S
from service.core.supervisor import WORKER_STOP_GRACE_S

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))
SCHEMAS = ROOT / "tests" / "data" / "kserve"
CRDS = {
    "ServingRuntime": SCHEMAS / "serving.kserve.io_servingruntimes.yaml",
    "InferenceService": SCHEMAS / "serving.kserve.io_inferenceservices.yaml",
}


def _schema(kind: str, api_version: str) -> dict[str, Any]:
    crd = yaml.safe_load(CRDS[kind].read_text())
    version = api_version.split("/")[1]
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return found["schema"]["openAPIV3Schema"]


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _pruned(document: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Paths of fields the schema does not declare: Kubernetes drops those silently."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(document, dict) and "properties" in schema:
        for key, value in document.items():
            inner = schema["properties"].get(key)
            if inner is None:
                found.append(f"{where}.{key}")
            else:
                found += _pruned(value, inner, f"{where}.{key}")
    elif isinstance(document, list) and "items" in schema:
        for i, item in enumerate(document):
            found += _pruned(item, schema["items"], f"{where}[{i}]")
    return found


def _check(document: dict[str, Any]) -> list[str]:
    schema = _schema(document["kind"], document["apiVersion"])
    validator = jsonschema.Draft7Validator(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in
                validator.iter_errors(document)]  # fmt: skip
    return problems + [f"{path}: not in the schema" for path in _pruned(document, schema)]


def test_there_are_runtimes_and_inference_services() -> None:
    kinds = sorted(_load(path)["kind"] for path in MANIFESTS)
    assert kinds == ["InferenceService", "InferenceService", "ServingRuntime", "ServingRuntime"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_passes_kserve_s_crd_schema(path: Path) -> None:
    assert _check(_load(path)) == []


def test_the_schema_check_catches_a_wrong_type_and_a_misspelt_field() -> None:
    runtime = _load(ROOT / "deploy" / "kserve" / "servingruntime.yaml")
    wrong_type = copy.deepcopy(runtime)
    wrong_type["spec"]["protocolVersions"] = "v2"
    assert any("protocolVersions" in p for p in _check(wrong_type))
    misspelt = copy.deepcopy(runtime)
    misspelt["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/"}}
    assert ".spec.containers[0].readinesProbe: not in the schema" in _check(misspelt)


def _runtimes() -> dict[str, dict[str, Any]]:
    docs = [_load(path) for path in MANIFESTS]
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServingRuntime"}


@pytest.mark.parametrize("name", ["escort-serve", "escort-serve-cpu"])
def test_the_container_runs_escort_serve_with_settings_it_accepts(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = _runtimes()[name]["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["command"] == ["escort", "serve"]
    # KServe fills {{.Name}} with the InferenceService's name: the manifest served.
    argv = [arg.replace("{{.Name}}", "resnet50-uniform90") for arg in container["args"]]
    flags = parse_serve_args(argv).settings
    env = {e["name"]: e["value"] for e in container["env"]}
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(flags=flags)
    assert settings.model_names == ("resnet50-uniform90",)
    assert settings.models_dir == "/mnt/models"  # where KServe's storage initializer copies to
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": settings.port, "h2c": settings.grpc_port} and settings.grpc
    assert settings.host == "0.0.0.0"
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe",
                        "/v2/health/live"), ("startupProbe", "/v2/health/ready")):  # fmt: skip
        assert container[probe]["httpGet"] == {"path": path, "port": settings.port}
    annotations = _runtimes()[name]["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(settings.port)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == "1") == (name == "escort-serve")
    assert settings.device == ("cuda" if name == "escort-serve" else "cpu")


def test_inference_services_name_a_runtime_that_serves_their_format() -> None:
    runtimes = _runtimes()
    services = [d for d in map(_load, MANIFESTS) if d["kind"] == "InferenceService"]
    for service in services:
        model = service["spec"]["predictor"]["model"]
        runtime = runtimes[model["runtime"]]
        formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
        (container,) = runtime["spec"]["containers"]
        drain = float(next(e["value"] for e in container["env"]
                           if e["name"] == "ESCORT_DRAIN_TIMEOUT_S"))  # fmt: skip
        grace = service["spec"]["predictor"].get("terminationGracePeriodSeconds", 30)
        # The whole stop (drain, last answers, a stuck worker's grace) ends before the
        # kubelet's SIGKILL.
        assert drain + FINISH_S + WORKER_STOP_GRACE_S <= grace
    by_storage = [s for s in services if "storageUri" in s["spec"]["predictor"]["model"]]
    assert by_storage and all(
        s["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for s in by_storage
    )
