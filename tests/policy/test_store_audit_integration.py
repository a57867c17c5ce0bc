"""The audit chain stored through the real store service, both in process."""
from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.runtime import running_service
from services.policy.config import Settings as PolicySettings
from services.policy.server import App as PolicyApp
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store_app
from tests.policy.builders import WORKSPACE, shell_call
from tests.policy.replicas import policy_replica, running_store
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


async def test_a_deleted_tail_is_reported_by_a_policy_service_started_afterwards(tmp_path: Path) -> None:
    """The store keeps each chain's head apart from its entries, so a fresh service still knows where it ended."""
    async with running_store(tmp_path / "store") as store:
        async with policy_replica(store.target) as before:
            for command in ("ls", "make build", "sudo reboot", "pwd", "make test"):
                await before.service.evaluate(shell_call(command))
            assert (await before.service.verify_audit("acme")).ok
        database = store.database
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("DELETE FROM store_audit WHERE tenant_id = 'acme' AND seq > 3")
    async with running_store(tmp_path / "store") as store, policy_replica(store.target) as after:
        report = await after.service.verify_audit("acme")
        assert not report.ok and report.num_checked == 3 and report.first_broken_seq == 4
        assert "entries 4..5 are missing" in report.reason and "store's head" in report.reason


async def test_two_policy_services_on_one_store_share_approvals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                ) -> None:
    monkeypatch.setenv("LLMESH_AUDIT_KEY", "k" * 32)  # replicas share the audit key
    async with running_store(tmp_path / "store") as store:
        apps = [PolicySettings(port=0, data_dir=str(tmp_path / f"policy-{i}"), audit_backend="store",
                               store_target=store.target) for i in range(2)]
        async with (running_service(PolicyApp(apps[0]), apps[0]) as a, running_service(PolicyApp(apps[1]), apps[1])
                    as b, service_channel(a.address, "tools") as tools_a,
                    service_channel(b.address, "orchestrator") as orchestrator_b):
            evaluate = policy_pb2_grpc.PolicyServiceStub(tools_a).Evaluate
            request = policy_pb2.EvaluateRequest(tenant_id="acme", session_id="s1", tool_name="shell",
                                                 workspace_root=WORKSPACE,
                                                 arguments_json=json.dumps({"command": "make build"}))
            asked = await evaluate(request)
            assert asked.decision == policy_pb2.DECISION_PROMPT
            await policy_pb2_grpc.PolicyServiceStub(orchestrator_b).RecordApproval(policy_pb2.RecordApprovalRequest(
                request_id="r1", tenant_id="acme", session_id="s1", approval_id=asked.approval_id,
                decision=policy_pb2.APPROVAL_DECISION_APPROVE_SESSION, approver="ana"))
            allowed = await evaluate(request)
            assert allowed.decision == policy_pb2.DECISION_ALLOW and allowed.approved_by_cache
