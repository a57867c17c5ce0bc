"""The Kubernetes manifests: parse, wire together, and probe the right names."""
from __future__ import annotations

import re
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


HEALTHCHECK = ["python", "-m", "services.common.healthcheck"]
CREDENTIALS_SECRET = "llmesh-credentials"
MOUNT = "/etc/llmesh/credentials"


def test_every_service_has_a_deployment_with_tls_capable_health_probes(docs: list[dict]) -> None:
    # kubelet's grpc probe cannot speak TLS: the probes exec the mesh's own check.
    deployments = of_kind(docs, "Deployment")
    for name, full_name in SERVICE_NAMES.items():
        main = container(deployments[name])
        port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
        assert main["readinessProbe"]["exec"]["command"] == [
            *HEALTHCHECK, "--port", str(port), "--service", full_name, "--identity", name]
        assert main["livenessProbe"]["exec"]["command"] == [*HEALTHCHECK, "--port", str(port), "--identity", name], \
            "liveness asks for the empty name"
        for probe in (main["readinessProbe"], main["livenessProbe"]):
            assert "grpc" not in probe and probe["timeoutSeconds"] >= 3
        assert main["command"][:3] == ["python", "-m", f"services.{name}"]
        assert str(port) in main["command"]


def test_the_healthcheck_command_parses_with_the_pods_settings(docs: list[dict], tmp_path: Path, capsys) -> None:
    from services.common import healthcheck
    from services.common.identity import init_tls

    init_tls(tmp_path, names=tuple(SERVICE_NAMES))
    environ = {**of_kind(docs, "ConfigMap")["llmesh-settings"]["data"], "LLMESH_CREDENTIALS_DIR": str(tmp_path)}
    for deployment in (of_kind(docs, "Deployment")[name] for name in SERVICE_NAMES):
        main = container(deployment)
        for probe in (main["readinessProbe"], main["livenessProbe"]):
            args = probe["exec"]["command"][len(HEALTHCHECK):]
            assert args[0] == "--port"
            # A closed port: arguments and settings are accepted, TLS files found, the answer is "not serving".
            closed = [args[0], "1", *args[2:], "--timeout-s", "0.5"]
            assert healthcheck.main(closed, environ) == 1
            assert "UNAVAILABLE" in capsys.readouterr().err, "it got as far as connecting"


def credentials_volume(deployment: dict) -> tuple[dict, dict]:
    """The pod's mount of the credentials Secret and its volume."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == CREDENTIALS_SECRET]
    assert len(volumes) == 1, deployment["metadata"]["name"]
    (volume,) = volumes
    mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
    assert len(mounts) == 1, deployment["metadata"]["name"]
    return mounts[0], volume["secret"]


def test_every_deployment_mounts_only_its_own_credentials_read_only(docs: list[dict]) -> None:
    deployments = of_kind(docs, "Deployment")
    assert set(deployments) == {*SERVICE_NAMES, "envoy"}
    for name, deployment in deployments.items():
        mount, secret = credentials_volume(deployment)
        assert mount["readOnly"] is True and mount["mountPath"] == MOUNT, name
        assert secret["defaultMode"] & 0o077 in (0, 0o040), f"{name}: owner (and Envoy's group) only"
        items = {item["key"]: item["path"] for item in secret["items"]}
        for key, path in items.items():
            assert "/" not in key and Path(path).name == key, f"{name}: a Secret key is the file's name"
            assert not path.startswith("clients/") and key != "ca-key.pem", f"{name}: no client keys, no CA key"
        tls = {"tls/ca.pem", f"tls/{name}.pem", f"tls/{name}-key.pem"}
        if name == "envoy":
            assert set(items.values()) == tls, "Envoy authenticates nobody: TLS files only"
        else:
            assert set(items.values()) == {"api_keys.json", f"services/{name}.key", *tls}, name


def test_every_pod_has_auth_and_tls_on(docs: list[dict]) -> None:
    settings = of_kind(docs, "ConfigMap")["llmesh-settings"]["data"]
    assert settings["LLMESH_CREDENTIALS_DIR"] == MOUNT
    assert settings["LLMESH_TLS_ENABLED"] == "true"
    assert settings.get("LLMESH_TLS_REQUIRE_CLIENT_CERT", "true") == "true"
    assert settings["LLMESH_AUDIT_TARGET"] == settings["LLMESH_POLICY_TARGET"] == "policy:50054"
    assert settings.get("LLMESH_AUTH_ENABLED", "true") == "true"
    for name, deployment in of_kind(docs, "Deployment").items():
        if name == "envoy":
            continue
        main = container(deployment)
        assert {"configMapRef": {"name": "llmesh-settings"}} in main["envFrom"], name
        env = {e["name"]: e.get("value") for e in main.get("env", [])}
        assert not any(k.endswith("_AUTH_ENABLED") or k.endswith("_TLS_ENABLED") or k.endswith("_CREDENTIALS_DIR")
                       for k in env), f"{name} overrides the mesh's auth/TLS settings"
    everything = "\n".join(path.read_text() for path in K8S.glob("*.yaml")).upper()
    assert "AUTH_ENABLED: \"FALSE\"" not in everything and "AUTH_ENABLED: FALSE" not in everything


def test_the_secret_keys_are_the_files_the_identity_cli_makes(docs: list[dict], tmp_path: Path) -> None:
    from services.common.identity import init_tls, service_key

    for name in SERVICE_NAMES:
        service_key(tmp_path, name)
    init_tls(tmp_path)  # the default names include Envoy's
    for name, deployment in of_kind(docs, "Deployment").items():
        _mount, secret = credentials_volume(deployment)
        for item in secret["items"]:
            assert (tmp_path / item["path"]).is_file(), f"{name}: {item['path']} is not made by the CLI"


def test_only_envoy_is_reachable_from_outside_and_only_the_client_apis(docs: list[dict]) -> None:
    services = of_kind(docs, "Service")
    exposed = {name for name, s in services.items() if s["spec"].get("type", "ClusterIP") != "ClusterIP"}
    assert exposed == {"envoy"}
    assert services["envoy"]["spec"]["selector"] == {"app": "envoy"}
    assert [p["port"] for p in services["envoy"]["spec"]["ports"]] == [443]
    for name in ("store", "policy", "tools"):
        assert services[name]["spec"].get("type", "ClusterIP") == "ClusterIP", name
        assert not any("nodePort" in p for p in services[name]["spec"]["ports"]), name
    assert not any("hostPort" in p for d in of_kind(docs, "Deployment").values()
                   for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"])


def test_envoys_bootstrap_command_matches_its_mounts(docs: list[dict]) -> None:
    from deploy.envoy import EnvoySettings
    from services.common.settings import load_settings

    comments = " ".join(line.lstrip("# ").rstrip("\\ ") for line in (K8S / "envoy.yaml").read_text().splitlines()
                        if line.startswith("#"))
    flags = re.search(r"python -m deploy\.envoy (.*?) --out envoy\.yaml", comments)
    assert flags, "envoy.yaml shows how its bootstrap is generated"
    settings = load_settings(EnvoySettings, "envoy", flags.group(1).split(), {})
    assert settings.tls_dir == f"{MOUNT}/tls"
    envoy = container(of_kind(docs, "Deployment")["envoy"])
    port = next(p for p in envoy["ports"] if p["name"] == "https")
    assert port["containerPort"] == settings.listen_port
    _mount, secret = credentials_volume(of_kind(docs, "Deployment")["envoy"])
    paths = {f"{MOUNT}/{item['path']}" for item in secret["items"]}
    certificate = settings.certificate()
    assert {settings.tls_file("ca.pem"), certificate["certificate_chain"]["filename"],
            certificate["private_key"]["filename"]} == paths


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
