"""The audit chain stored through the real store service, both in process."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.runtime import running_service
from services.policy.config import Settings as PolicySettings
from services.policy.server import App as PolicyApp
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store_app
from tests.policy.builders import WORKSPACE
from tests.support.auth import service_channel


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                ) -> AsyncIterator[tuple[policy_pb2_grpc.PolicyServiceStub, policy_pb2_grpc.PolicyServiceStub]]:
    """Policy stubs as tools (decisions) and as the gateway (audit reads); policy reaches the store as itself."""
    monkeypatch.delenv("LLMESH_AUDIT_KEY", raising=False)
    store_settings = StoreSettings(port=0, data_dir=str(tmp_path / "store"))
    async with running_service(build_store_app(store_settings), store_settings) as store:
        target = f"127.0.0.1:{store.port}"
        policy_settings = PolicySettings(port=0, data_dir=str(tmp_path / "policy"), audit_backend="store",
                                         store_target=target)
        async with (running_service(PolicyApp(policy_settings), policy_settings) as policy,
                    service_channel(policy.address, "tools") as tools,
                    service_channel(policy.address, "gateway") as gateway):
            yield policy_pb2_grpc.PolicyServiceStub(tools), policy_pb2_grpc.PolicyServiceStub(gateway)


async def test_decisions_are_chained_in_the_store_and_verify(
        stack: tuple[policy_pb2_grpc.PolicyServiceStub, policy_pb2_grpc.PolicyServiceStub]) -> None:
    tools, gateway = stack
    for command in ("ls", "make build", "sudo reboot"):
        reply = await tools.Evaluate(policy_pb2.EvaluateRequest(
            tenant_id="acme", session_id="s1", tool_name="shell", workspace_root=WORKSPACE,
            arguments_json=json.dumps({"command": command})))
        assert reply.audit_seq > 0
    page = await gateway.ListAudit(policy_pb2.ListAuditRequest(tenant_id="acme"))
    assert [e.seq for e in page.entries] == [1, 2, 3]
    assert page.entries[1].prev_hash == page.entries[0].entry_hash
    report = await gateway.VerifyAudit(policy_pb2.VerifyAuditRequest(tenant_id="acme"))
    assert report.ok and report.num_checked == 3
