"""The Kubernetes manifests against Kubernetes' own schemas, checkov's checks and the mesh's rules.

kubernetes-validate checks every object offline against the API schemas of
the oldest Kubernetes the manifests need (1.30: ``appArmorProfile``) and the
newest it knows, rejecting unknown fields. checkov scans the folder; a check
may be skipped only in the manifest (``checkov.io/skip<n>`` annotations)
with its reason. checkov cannot share the project's venv (deploy/
checkov-requirements.txt says why): `make test` makes one for it and names
it in LLMESH_CHECKOV.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.common.settings import load_settings
from services.launcher import SERVICES
from services.tools.config import Settings as ToolsSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# 1.30: the oldest release with securityContext.appArmorProfile, which the tools pod uses.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
DEFAULT_CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
WORKLOADS = ("Deployment", "StatefulSet")
# The capabilities the tools sandbox uses (services.yaml says why, one by one).
TOOLS_CAPABILITIES = {"SYS_ADMIN", "NET_ADMIN", "SETUID", "SETGID", "SETPCAP", "CHOWN", "FOWNER", "DAC_OVERRIDE",
                      "KILL"}

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOADS}


def pod(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def env_of(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """The container's plain environment: its ConfigMaps, then its own values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(of_kind(docs, "ConfigMap")[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


# Kubernetes' schemas ----------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(docs: list[Doc], version: str) -> None:
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_would_catch_a_misspelt_field(docs: list[Doc]) -> None:
    broken = copy.deepcopy(workloads(docs)["tools"])
    pod(broken)["containers"][0]["securityContex"] = {"runAsNonRoot": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# checkov ----------------------------------------------------------------------


def checkov_program() -> Path:
    named = os.environ.get("LLMESH_CHECKOV")
    if named:
        assert Path(named).is_file(), f"LLMESH_CHECKOV={named} does not exist"
        return Path(named)
    if not DEFAULT_CHECKOV.is_file():
        pytest.skip(f"checkov is not installed: `make test` makes its venv ({DEFAULT_CHECKOV.parent.parent})")
    return DEFAULT_CHECKOV


@pytest.fixture(scope="module")
def checkov_report() -> Doc:
    # --skip-download: offline, nothing fetched from the vendor's service.
    done = subprocess.run([str(checkov_program()), "--directory", str(K8S), "--framework", "kubernetes",
                           "--output", "json", "--skip-download"],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"})
    assert done.returncode in (0, 1), done.stderr[-4000:]  # 1: checks failed, reported below
    report = json.loads(done.stdout)
    reports: list[Doc] = report if isinstance(report, list) else [report]
    (kubernetes,) = [r for r in reports if r["check_type"] == "kubernetes"]
    return kubernetes


def test_checkov_fails_no_check(checkov_report: Doc) -> None:
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
              for c in checkov_report["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert checkov_report["summary"]["parsing_errors"] == 0


def test_checkov_read_every_object(checkov_report: Doc, docs: list[Doc]) -> None:
    # A file checkov cannot parse is left out silently (no failure, no error): see that it checked each one.
    results = checkov_report["results"]
    checked = [c for key in ("passed_checks", "failed_checks", "skipped_checks") for c in results[key]]
    resources = {c["resource"] for c in checked}
    for doc in docs:  # the kinds checkov has checks for (it has none for NetworkPolicy, say)
        if doc["kind"] in (*WORKLOADS, "Service", "ConfigMap", "Secret"):
            name = f"{doc['kind']}.{doc['metadata']['namespace']}.{doc['metadata']['name']}"
            assert name in resources, f"checkov did not check {name}"


def test_every_skipped_check_is_written_down_with_its_reason(checkov_report: Doc) -> None:
    skipped = checkov_report["results"]["skipped_checks"]
    assert skipped, "the tools pod's needs, at least, are written down as skips"
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason.split()) >= 6, f"{check['check_id']} on {check['resource']}: no reason given"
    texts = "\n".join(path.read_text() for path in K8S.glob("*.yaml"))
    annotations = re.findall(r"checkov\.io/skip\d+: \"(CKV2?_K8S_\d+)=", texts)
    assert len(annotations) == len(skipped), "every skip annotation is one skipped check, and no other skip"


# The mesh's own rules -------------------------------------------------------


def test_every_container_has_requests_and_limits(docs: list[Doc]) -> None:
    for name, workload in workloads(docs).items():
        for container in pod(workload)["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{name}: {kind}"


def test_every_pod_is_hardened_except_what_the_tools_sandbox_needs(docs: list[Doc]) -> None:
    for name, workload in workloads(docs).items():
        spec = pod(workload)
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert mounts.get("/tmp") in empty_dirs, f"{name}: a writable /tmp on a read-only root"
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            if name == "tools":
                continue
            assert "add" not in context["capabilities"], name
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
            assert "appArmorProfile" not in context, name


def test_the_tools_pod_gets_exactly_the_capabilities_its_sandbox_uses_and_says_why(docs: list[Doc]) -> None:
    spec = pod(workloads(docs)["tools"])
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert set(context["capabilities"]["add"]) == TOOLS_CAPABILITIES
    assert spec["securityContext"]["runAsUser"] == 0, "only root can start commands as each session's uid"
    assert context["appArmorProfile"] == {"type": "Unconfined"}, "the default profile forbids bubblewrap's mounts"
    assert "privileged" not in context and "hostPID" not in spec and "hostNetwork" not in spec
    text = (K8S / "services.yaml").read_text()
    for capability in TOOLS_CAPABILITIES:
        line = re.search(rf"^\s*- {capability}\s+#\s*(.+)$", text, re.M)
        assert line and len(line.group(1).split()) >= 4, f"{capability}: no reason beside it"
    env = env_of(container, docs)
    assert env["LLMESH_TOOLS_SANDBOX"] == "bwrap", "no silent fallback to a weaker sandbox"


def test_tools_replicas_share_one_workspace_volume(docs: list[Doc]) -> None:
    tools = workloads(docs)["tools"]
    assert tools["spec"]["replicas"] >= 2
    spec = pod(tools)
    (container,) = spec["containers"]
    settings = load_settings(ToolsSettings, "tools", [], env_of(container, docs))
    (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert Path(mount["mountPath"]) == settings.workspace_path and not mount.get("readOnly")
    claim = of_kind(docs, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica, on any node, mounts it"
    # The sandbox's uids as the service computes them fit the kernel's range.
    assert settings.sandbox_uid_base + settings.sandbox_uid_count <= 2**31 - 2


def test_every_replicated_workload_has_a_disruption_budget(docs: list[Doc]) -> None:
    budgets = of_kind(docs, "PodDisruptionBudget")
    for name, workload in workloads(docs).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets.values() if b["spec"]["selector"] == {"matchLabels": labels}]
        if workload["spec"]["replicas"] >= 2:
            assert len(covering) == 1, f"{name}: one PodDisruptionBudget"
            assert covering[0]["spec"]["maxUnavailable"] == 1, name
        else:
            assert not covering, f"{name}: a budget on one replica would block every drain"
    selected = {json.dumps(b["spec"]["selector"], sort_keys=True) for b in budgets.values()}
    assert len(selected) == len(budgets), "no two budgets on one set of pods"


def test_policy_replicas_share_one_audit_key(docs: list[Doc]) -> None:
    policy = workloads(docs)["policy"]
    assert policy["spec"]["replicas"] >= 2
    (container,) = pod(policy)["containers"]
    (key,) = [e for e in container["env"] if e["name"] == "LLMESH_AUDIT_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "llmesh-audit-key", "key": "audit.key"}
    assert "create secret generic llmesh-audit-key" in (K8S / "config.yaml").read_text()


def test_envoy_reaches_every_orchestrator_replica_to_hash_sessions_onto_them(docs: list[Doc]) -> None:
    comments = " ".join(line.lstrip("# ").rstrip("\\ ") for line in (K8S / "envoy.yaml").read_text().splitlines()
                        if line.startswith("#"))
    target = re.search(r"--orchestrator-target (\S+):(\d+)", comments)
    assert target, "envoy.yaml shows how its bootstrap is generated"
    service = of_kind(docs, "Service")[target.group(1).split(".")[0]]
    assert service["spec"]["clusterIP"] == "None", "a headless Service: DNS lists every replica"
    assert service["spec"]["selector"] == {"app": "orchestrator"}
    assert int(target.group(2)) in {p["port"] for p in service["spec"]["ports"]}


def allowed_sources(docs: list[Doc], app: str, port: int) -> set[str] | None:
    """The apps whose pods may connect to ``app`` on ``port``; None: any source at all."""
    sources: set[str] = set()
    for policy in of_kind(docs, "NetworkPolicy").values():
        selector = policy["spec"]["podSelector"]
        if not selector or not _selects(selector, app):
            continue
        for rule in policy["spec"].get("ingress", []):
            if port not in {p["port"] for p in rule.get("ports", [])}:
                continue
            if "from" not in rule:
                return None
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    return None
                sources |= _apps(peer["podSelector"])
    return sources


def _selects(selector: Doc, app: str) -> bool:
    return app in _apps(selector)


def _apps(selector: Doc) -> set[str]:
    apps = set(selector.get("matchLabels", {}).get("app", "").split()) - {""}
    for expression in selector.get("matchExpressions", []):
        assert expression["key"] == "app" and expression["operator"] == "In"
        apps |= set(expression["values"])
    return apps


def test_network_policies_let_exactly_the_mesh_calls_through(docs: list[Doc]) -> None:
    policies = of_kind(docs, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    ports = {d["metadata"]["name"]: next(p["containerPort"] for p in pod(d)["containers"][0]["ports"])
             for d in workloads(docs).values()}
    # Who calls whom, from the launcher's dependency table; every service reports refused
    # calls to policy (LLMESH_AUDIT_TARGET), and Envoy fronts the client APIs.
    expected: dict[str, set[str]] = {name: set() for name in ports}
    for service in SERVICES:
        for dependency in service.depends_on:
            expected[dependency].add(service.name)
        if service.name != "policy":
            expected["policy"].add(service.name)
    expected["orchestrator"].add("envoy")
    expected["inference"].add("envoy")
    expected["postgres"].add("store")
    for app, port in ports.items():
        if app == "envoy":
            assert allowed_sources(docs, app, port) is None, "Envoy's listener is the way in from outside"
        else:
            assert allowed_sources(docs, app, port) == expected[app], app
    for service in SERVICES:
        assert allowed_sources(docs, service.name, 9100) is None, f"{service.name}: metrics for Prometheus"
