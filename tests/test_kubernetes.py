"""examples/kubernetes: every core manifest valid against the Kubernetes schemas
(offline, kubernetes-validate), the Operator's resources in step with alerts/ and
grafana/dashboards/, their rules accepted by promtool, and the pod as hardened as
the README says. (No cluster here: the files are checked by the tools that read them.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kling_exporter.flags import DEFAULT_LISTEN

from examples.kubernetes import build
from tests.helpers import ROOT, require_binary

K8S = ROOT / "examples" / "kubernetes"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return found


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize(
    ("name", "doc"),
    [(n, d) for n, d in documents() if d["kind"] not in OPERATOR_KINDS],
    ids=lambda x: x if isinstance(x, str) else x["kind"],
)
def test_core_manifests_are_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_generated_resources_are_in_step_with_alerts_and_dashboards() -> None:
    assert build.main(["--check"]) == 0
    rule = by_kind("PrometheusRule")
    shipped = []
    for name in ("kling.rules.yml", "kling.alerts.yml"):
        shipped += yaml.safe_load((ROOT / "alerts" / name).read_text())["groups"]
    assert rule["spec"]["groups"] == shipped
    dashboards = next(
        d for _, d in documents() if d["metadata"]["name"] == "kling-exporter-dashboards"
    )
    assert dashboards["metadata"]["labels"] == {"grafana_dashboard": "1"}
    for path in (ROOT / "grafana" / "dashboards").glob("*.json"):
        assert json.loads(dashboards["data"][path.name]) == json.loads(path.read_text())


def test_prometheus_rule_groups_pass_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": by_kind("PrometheusRule")["spec"]["groups"]}))
    result = subprocess.run(
        [require_binary("promtool"), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_sidecar_is_hardened_probed_and_wired() -> None:
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    containers = {c["name"]: c for c in pod["containers"]}
    exporter = containers["kling-exporter"]
    for container in containers.values():
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "memory" in container["resources"]["limits"]
    assert exporter["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert exporter["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    port = int(DEFAULT_LISTEN.rsplit(":", 1)[1])
    assert exporter["ports"][0]["containerPort"] == port
    # The log folder and the state are on the one emptyDir both containers mount.
    config = yaml.safe_load(
        next(d for _, d in documents() if d["metadata"]["name"] == "kling-exporter-config")["data"][
            "config.yml"
        ]
    )
    mounts = {m["mountPath"]: m for m in exporter["volumeMounts"]}
    log_dir = str(Path(config["logs"]["paths"][0]).parent)
    state_dir = str(Path(config["state"]["path"]).parent)
    assert mounts[log_dir]["name"] == mounts[state_dir]["name"] == "kling-data"
    worker_mounts = {m["mountPath"]: m["name"] for m in containers["worker"]["volumeMounts"]}
    assert worker_mounts[log_dir] == "kling-data"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["kling-data"]
    service = by_kind("Service")
    # The rules select job="kling-exporter", which the Operator takes from the Service.
    assert service["metadata"]["name"] == "kling-exporter"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    monitor = by_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
