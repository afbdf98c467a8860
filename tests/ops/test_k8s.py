"""deploy/k8s: every manifest validates against the Kubernetes JSON schemas (shipped offline by
the kubernetes-validate package), and the pieces agree with each other and with the service."""

from __future__ import annotations

import copy

import pytest
import yaml

from service.core.http_server import FINISH_S
from service.core.supervisor import WORKER_STOP_GRACE_S
from tests.ops.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def _documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return _documents()


@pytest.fixture(scope="module")
def validator():
    kv = pytest.importorskip("kubernetes_validate")

    def validate(doc: dict) -> None:
        kv.validate(doc, kv.latest_version(), strict=True)

    return validate


def test_every_core_manifest_matches_the_schema(docs: dict[str, dict], validator) -> None:
    assert set(docs) >= CORE_KINDS
    for kind in CORE_KINDS:
        validator(docs[kind])


def test_the_schema_check_catches_mistakes(docs: dict[str, dict], validator) -> None:
    import kubernetes_validate as kv

    typo = copy.deepcopy(docs["Deployment"])
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        validator(typo)
    wrong_type = copy.deepcopy(docs["Service"])
    wrong_type["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kv.ValidationError):
        validator(wrong_type)


def _container(docs: dict[str, dict]) -> dict:
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_one_gpu_per_replica_and_probes_on_v2_health(docs: dict[str, dict]) -> None:
    container = _container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports["http"] == int(env["ESCORT_PORT"])
    assert ports["grpc"] == int(env["ESCORT_GRPC_PORT"])
    service_ports = {p["name"]: p["targetPort"] for p in docs["Service"]["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc"}
    assert env["ESCORT_HOST"] == "0.0.0.0" and env["ESCORT_DEVICE"] == "cuda"
    assert env["ESCORT_BACKEND"] in env["ESCORT_BACKENDS"].split(",")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_env_names_are_service_settings(docs: dict[str, dict]) -> None:
    settings = pytest.importorskip("service.config").Settings
    env = {e["name"]: e.get("value") for e in _container(docs)["env"]}
    values = {k.removeprefix("ESCORT_").lower(): v for k, v in env.items() if v is not None}
    settings(**values)  # raises on an unknown name or a bad value, as the service would
    assert all(k.removeprefix("ESCORT_").lower() in settings.model_fields for k in env)


def test_termination_grace_covers_prestop_and_drain(docs: dict[str, dict]) -> None:
    container = _container(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    drain_s = float(next(e["value"] for e in container["env"]
                         if e["name"] == "ESCORT_DRAIN_TIMEOUT_S"))  # fmt: skip
    grace_s = pod["terminationGracePeriodSeconds"]
    # Long enough for the endpoints to drop the pod (> one readiness period) ...
    assert pre_stop_s >= container["readinessProbe"]["periodSeconds"]
    # ... and for the whole stop afterwards: the drain, the last answers, and the time the
    # supervisor gives a stuck worker before it kills it; but not pointlessly longer.
    stop_s = drain_s + FINISH_S + WORKER_STOP_GRACE_S
    assert pre_stop_s + stop_s <= grace_s <= pre_stop_s + drain_s + 30


def test_service_hpa_pdb_and_monitor_point_at_the_deployment(docs: dict[str, dict]) -> None:
    deployment = docs["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "escort_queue_depth"  # a metric the service exports
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels.items()
    )
    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_hpa_alone_sets_the_replica_count(docs: dict[str, dict]) -> None:
    # A fixed spec.replicas would fight the HPA: every `kubectl apply` would reset the count.
    assert "replicas" not in docs["Deployment"]["spec"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # The PDB keeps working at the HPA's minimum: it bounds unavailability, not availability.
    assert "maxUnavailable" in docs["PodDisruptionBudget"]["spec"]


def test_kustomization_lists_the_core_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert all((K8S / name).is_file() for name in resources)
    kinds = {yaml.safe_load((K8S / name).read_text())["kind"] for name in resources}
    assert kinds == CORE_KINDS  # the ServiceMonitor needs the operator's CRDs: applied apart


def test_every_manifest_file_is_known() -> None:
    names = {path.name for path in K8S.glob("*.yaml")}
    assert names == {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml",
                     "servicemonitor.yaml", "kustomization.yaml"}  # fmt: skip
