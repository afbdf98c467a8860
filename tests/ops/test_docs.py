"""docs/operations.md documents every LOADTEST_* setting and every deployment file."""

from __future__ import annotations

import re

from tests.ops.conftest import ROOT

DOC = (ROOT / "docs" / "operations.md").read_text()


def test_every_loadtest_setting_is_documented() -> None:
    code = "\n".join(path.read_text() for path in (ROOT / "loadtest").glob("*.py"))
    names = set(re.findall(r"\bLOADTEST_[A-Z0-9_]*[A-Z0-9]\b", code))
    missing = sorted(name for name in names if not re.search(rf"`{name}[`=]", DOC))
    assert not missing, f"not in docs/operations.md: {missing}"


def test_every_manifest_and_compose_service_is_documented() -> None:
    for path in (ROOT / "deploy" / "k8s").glob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert f"`{path.name}`" in DOC, path.name
    for service in ("escort", "escort-cpu", "escort-gpu0", "escort-gpu1", "lb", "prometheus",
                    "grafana"):  # fmt: skip
        assert f"`{service}`" in DOC, service
