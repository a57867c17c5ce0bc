"""The Kubernetes manifests: parse, wire together, and probe the right names."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.inference.client.config import load_balancer_settings
from services.inference.client.discovery import split_host_port

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
SERVICE_NAMES = {
    "store": "llmesh.store.v1.StoreService",
    "policy": "llmesh.policy.v1.PolicyService",
    "tools": "llmesh.tools.v1.ToolService",
    "orchestrator": "llmesh.orchestrator.v1.AgentService",
    "inference": "llmesh.inference.v1.InferenceService",
}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_every_service_has_a_deployment_with_grpc_probes(docs: list[dict]) -> None:
    deployments = of_kind(docs, "Deployment")
    for name, full_name in SERVICE_NAMES.items():
        main = container(deployments[name])
        port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
        assert main["readinessProbe"]["grpc"] == {"port": port, "service": full_name}
        assert main["livenessProbe"]["grpc"] == {"port": port}, "liveness asks for the empty name"
        assert main["command"][:3] == ["python", "-m", f"services.{name}"]
        assert str(port) in main["command"]


def test_services_select_their_pods_and_target_named_ports(docs: list[dict]) -> None:
    deployments = of_kind(docs, "Deployment")
    for service in of_kind(docs, "Service").values():
        selector = service["spec"]["selector"]
        owners = [d for d in deployments.values() if d["spec"]["template"]["metadata"]["labels"] == selector]
        owners += [s for s in of_kind(docs, "StatefulSet").values()
                   if s["spec"]["template"]["metadata"]["labels"] == selector]
        assert len(owners) == 1, service["metadata"]["name"]
        port_names = {p["name"] for c in owners[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_settings_point_at_real_services_and_the_headless_node_list(docs: list[dict]) -> None:
    settings = of_kind(docs, "ConfigMap")["llmesh-settings"]["data"]
    services = of_kind(docs, "Service")
    for key in ("LLMESH_STORE_TARGET", "LLMESH_POLICY_TARGET", "LLMESH_TOOLS_TARGET", "LLMESH_ORCHESTRATOR_TARGET"):
        host, port = split_host_port(settings[key])
        assert port in {p["port"] for p in services[host]["spec"]["ports"]}, key
    balancer = load_balancer_settings(environ=settings)
    (entry,) = balancer.nodes
    host, port = split_host_port(entry.removeprefix("dns:"))
    headless = services[host.split(".")[0]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == {"app": "inference"}
    assert balancer.health_interval_s == 1.0


def test_store_reads_its_postgresql_url_from_the_secret(docs: list[dict]) -> None:
    store = container(of_kind(docs, "Deployment")["store"])
    assert {"secretRef": {"name": "llmesh-database"}} in store["envFrom"]
    url = of_kind(docs, "Secret")["llmesh-database"]["stringData"]["LLMESH_STORE_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
    assert "postgres" in of_kind(docs, "StatefulSet")


def test_every_object_lives_in_the_llmesh_namespace(docs: list[dict]) -> None:
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"llmesh"}
