"""deploy/prometheus/alerts.yml: well formed, and every metric it names is one the services export.

The services run in process (inference on its synthetic backend, auth on as
everywhere, keys in a temporary credentials directory), serve some real
traffic so labelled series exist, and their /metrics endpoints are scraped
over HTTP: a renamed metric or label breaks this test, not the pager.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import yaml
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from llmesh.store.v1 import store_pb2, store_pb2_grpc
from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.clients import make_channel
from services.common.identity import init_tls
from services.common.runtime import running_service
from services.inference.config import Settings as InferenceSettings
from services.inference.server import build_app as build_inference
from services.policy.config import Settings as PolicySettings
from services.policy.server import build_app as build_policy
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from services.tools.config import Settings as ToolsSettings
from services.tools.server import build_app as build_tools
from tests.support.auth import TLS, service_identity
from tests.support.waiting import wait_until

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
SEVERITIES = {"info", "warning", "critical"}
DURATION = re.compile(r"^\d+(ms|s|m|h|d)$")
# A selector: metric name, optional {matchers}.
SELECTOR = re.compile(r"\b(llmesh_[a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
# Labels Prometheus adds at scrape time, not the service.
TARGET_LABELS = {"job", "instance"}


def load_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_rule_is_complete_and_uniquely_named() -> None:
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
        expr = rule["expr"]
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), (rule["alert"], opening)
        assert SELECTOR.search(expr), f"{rule['alert']} names no llmesh metric"


def test_the_issue_alerts_exist() -> None:
    names = {rule["alert"] for rule in load_rules()}
    assert {"LlmeshRpcLatencyOverBudget", "LlmeshToolFailureRate", "LlmeshInferenceQueueSaturated",
            "LlmeshToolQueueSaturated", "LlmeshEventWriterSaturated"} <= names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    subprocess.run(["promtool", "check", "rules", str(ALERTS)], check=True, capture_output=True, text=True)


def named_metrics() -> set[str]:
    """Every metric the alert rules name."""
    return {match.group(1) for rule in load_rules() for match in SELECTOR.finditer(rule["expr"])}


def exported_series(text: str) -> dict[str, set[str]]:
    """Series name -> label names seen, from one scrape (types expanded to their series)."""
    series: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        for suffix in suffixes:
            series[family.name + suffix]  # present even without samples yet
        for sample in family.samples:
            series[sample.name] |= set(sample.labels) - {"le"}
    return series


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


async def serve_traffic(store_port: int, tools_port: int, inference_port: int, credentials: Path) -> None:
    # The orchestrator may call all three (docs/auth.md); acting for no client, it names the tenant.
    orchestrator = service_identity("orchestrator", credentials)
    async with make_channel(f"127.0.0.1:{store_port}", orchestrator, traced=False) as channel:
        store = store_pb2_grpc.StoreServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):  # an error so the error counter has a series
            await store.GetSession(store_pb2.GetSessionRequest(tenant_id="acme", session_id="missing"))
        await store.CreateSession(store_pb2.CreateSessionRequest(tenant_id="acme", session_id="s1"))
        await store.ReadEvents(store_pb2.ReadEventsRequest(tenant_id="acme", session_id="s1"))
        await store.EnqueueTask(store_pb2.EnqueueTaskRequest(tenant_id="acme", queue="q", payload_json="{}"))
    async with make_channel(f"127.0.0.1:{tools_port}", orchestrator, traced=False) as channel:
        tools = tools_pb2_grpc.ToolServiceStub(channel)
        await tools.ExecuteTool(tools_pb2.ExecuteToolRequest(
            tenant_id="acme", session_id="s1", role="developer",
            call=tools_pb2.ToolCall(call_id="c1", name="fs_list", arguments_json='{"path": "."}')))
    async with make_channel(f"127.0.0.1:{inference_port}", orchestrator, traced=False) as channel:
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(prompt="hi", sampling=inference_pb2.SamplingParams(max_tokens=4))
        assert len([reply async for reply in inference.Generate(request)]) == 4
        await inference.GetLoad(inference_pb2.GetLoadRequest())


async def test_every_metric_and_label_in_the_rules_is_exported(tmp_path: Path) -> None:
    workspace = Path(tempfile.mkdtemp(prefix="llmesh-alerts-"))
    credentials = tmp_path / "credentials"
    if TLS:
        init_tls(credentials)
    common = {"port": 0, "metrics_port": 0, "credentials_dir": str(credentials)}
    store_conf = StoreSettings(**common, data_dir=str(tmp_path / "store"))
    tools_conf = ToolsSettings(**common, data_dir=str(tmp_path / "tools"), sandbox="none",
                               sandbox_uid=-1, sandbox_gid=-1, workspace_root=str(workspace))
    policy_conf = PolicySettings(**common, data_dir=str(tmp_path / "policy"), audit_backend="memory")
    inference_conf = InferenceSettings(**common, backend="synthetic", n_ctx=256, n_seq_max=2,
                                       synthetic_tokens_per_s=0.0)
    try:
        async with running_service(build_store(store_conf), store_conf) as store, \
                running_service(build_tools(tools_conf), tools_conf) as tools, \
                running_service(build_policy(policy_conf), policy_conf) as policy, \
                running_service(build_inference(inference_conf), inference_conf) as inference:
            await serve_traffic(store.port, tools.port, inference.port, credentials)
            services = (store, tools, policy, inference)
            assert all(svc.metrics_port for svc in services)
            exported: dict[str, set[str]] = defaultdict(set)

            async def every_named_metric_is_exported() -> bool:
                # Some series (the inference load gauges) appear only on the engine's next report.
                nonlocal exported
                exported = defaultdict(set)
                for svc in services:
                    text = await asyncio.to_thread(scrape, svc.metrics_port)
                    for name, labels in exported_series(text).items():
                        exported[name] |= labels
                return named_metrics() <= exported.keys()

            # Not asserted here: the checks below say what is missing if it never holds.
            await wait_until(every_named_metric_is_exported, timeout_s=10, interval_s=0.1)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    for rule in load_rules():
        for match in SELECTOR.finditer(rule["expr"]):
            name, matchers = match.group(1), match.group(2) or ""
            assert name in exported, f"{rule['alert']}: {name} is not exported"
            for label in MATCHER_LABEL.findall(matchers):
                if label[0] not in TARGET_LABELS and exported[name]:
                    assert label[0] in exported[name], f"{rule['alert']}: {name} has no label {label[0]}"
        for label in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            for item in (part.strip() for part in label.split(",")):
                assert item in TARGET_LABELS | {"le"} | set().union(*exported.values()), (rule["alert"], item)
