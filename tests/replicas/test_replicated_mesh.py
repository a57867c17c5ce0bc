"""The replicated mesh of ``make run REPLICAS=2 DB=postgres``: any call may land on any replica.

Two replicas each of the store, policy, tools and orchestrator on a
throw-away PostgreSQL cluster, started by the launcher as a user starts
them; inference is the synthetic node with a scripted reply (a shell_exec
call the default policy asks a person about), so turns are cheap and every
turn can reach an approval. The scenarios are those of ``make
bench-replicas`` (bench/replicas.py); here their outcomes are asserted, never
their delays.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest
from llmesh.policy.v1 import policy_pb2 as ppb
from llmesh.policy.v1 import policy_pb2_grpc as ppb_grpc
from llmesh.store.v1 import store_pb2 as spb
from llmesh.store.v1 import store_pb2_grpc as spb_grpc

from bench.replicas import (
    TENANT,
    agents,
    cross_replica_approvals,
    cross_replica_cancels,
    new_session,
    replica_kills,
    replicated,
)
from tests.support.auth import service_channel
from tests.support.mesh import LaunchedMesh

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedMesh]:
    with replicated(tmp_path_factory.mktemp("replicated")) as mesh:
        yield mesh


@pytest.mark.timeout(600)
async def test_every_cancel_sent_through_the_other_replica_stops_its_run(mesh: LaunchedMesh) -> None:
    result = await cross_replica_cancels(mesh, runs=100)
    assert result["stopped"] == 100, result


@pytest.mark.timeout(600)
async def test_every_approval_submitted_through_the_other_replica_unblocks_its_run(mesh: LaunchedMesh) -> None:
    result = await cross_replica_approvals(mesh, runs=100)
    assert result["approvals_lost"] == 0, result


def _shell_call(session_id: str, command: str) -> ppb.EvaluateRequest:
    return ppb.EvaluateRequest(tenant_id=TENANT, session_id=session_id, role="developer", tool_name="shell_exec",
                               arguments_json=f'{{"command": "{command}"}}', workspace_root="/workspace",
                               risk_level=3)


async def _restart(mesh: LaunchedMesh, service: str, replica: int) -> None:
    since = len(mesh.lines)
    old = mesh.kill(service, replica)
    text = f"{service}-{replica} restarted and ready"
    for _ in range(1200):
        if any(text in line for line in mesh.lines[since:]):
            assert mesh.pid(service, replica) != old
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service}-{replica} did not come back:\n" + "".join(mesh.lines[-30:]))


@pytest.mark.timeout(600)
async def test_a_grant_made_on_one_policy_replica_holds_on_the_other_and_after_restarting_both(
        mesh: LaunchedMesh) -> None:
    async with agents(mesh) as a:
        session_id = await new_session(a.any)
    one, two = mesh.replica_targets("policy")
    command = "deploy-widget --everywhere"

    async def evaluate(target: str) -> ppb.EvaluateResponse:
        # As the tools service asks before it runs a call.
        async with service_channel(target, "tools", mesh.credentials, mesh.tls) as channel:
            return await ppb_grpc.PolicyServiceStub(channel).Evaluate(_shell_call(session_id, command), timeout=30)

    asked = await evaluate(one)
    assert asked.decision == ppb.DECISION_PROMPT and asked.approval_id, asked
    async with service_channel(one, "orchestrator", mesh.credentials, mesh.tls) as channel:
        await ppb_grpc.PolicyServiceStub(channel).RecordApproval(ppb.RecordApprovalRequest(
            request_id=uuid.uuid4().hex, tenant_id=TENANT, session_id=session_id, approval_id=asked.approval_id,
            decision=ppb.APPROVAL_DECISION_APPROVE_SESSION, approver="ops"), timeout=30)
    # At once on the other replica: no watch delay decides it.
    on_two = await evaluate(two)
    assert on_two.decision == ppb.DECISION_ALLOW and on_two.approved_by_cache, on_two
    # Both replicas restarted (one at a time, so the service stays up): the grant is in the store.
    await _restart(mesh, "policy", 1)
    await _restart(mesh, "policy", 2)
    for target in (one, two):
        again = await evaluate(target)
        assert again.decision == ppb.DECISION_ALLOW and again.approved_by_cache, (target, again)


@pytest.mark.timeout(300)
async def test_a_stale_owners_append_is_refused_with_failed_precondition(mesh: LaunchedMesh) -> None:
    async with agents(mesh) as a:
        session_id = await new_session(a.any)
    one, two = mesh.replica_targets("store")
    async with service_channel(one, "orchestrator", mesh.credentials, mesh.tls) as ch1, \
            service_channel(two, "orchestrator", mesh.credentials, mesh.tls) as ch2:
        first, second = spb_grpc.StoreServiceStub(ch1), spb_grpc.StoreServiceStub(ch2)
        old = await first.AcquireSessionLock(spb.AcquireSessionLockRequest(
            tenant_id=TENANT, session_id=session_id, owner_id="old-owner", lease_ms=1), timeout=30)
        assert old.acquired
        # The lease (1 ms) has lapsed: another owner takes the lock through the other store replica.
        for _ in range(100):
            new = await second.AcquireSessionLock(spb.AcquireSessionLockRequest(
                tenant_id=TENANT, session_id=session_id, owner_id="new-owner", lease_ms=60_000), timeout=30)
            if new.acquired:
                break
            await asyncio.sleep(0.01)
        assert new.acquired and new.fencing_token > old.fencing_token
        event = spb.Event(type="token", payload=b"{}")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first.AppendEvents(spb.AppendEventsRequest(
                tenant_id=TENANT, session_id=session_id, events=[event], fencing_token=old.fencing_token,
                no_drop=True), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "fencing_token" in (refused.value.details() or "")
        stored = await second.AppendEvents(spb.AppendEventsRequest(
            tenant_id=TENANT, session_id=session_id, events=[event], fencing_token=new.fencing_token,
            no_drop=True), timeout=30)
        assert list(stored.seqs) == [1]


@pytest.mark.timeout(1500)
async def test_killing_the_replica_running_a_turn_loses_and_duplicates_no_event(mesh: LaunchedMesh) -> None:
    result = await replica_kills(mesh, kills=50)
    assert result["problems"] == [], result
    # Every Resume ended: with the dead run's terminal event, or (killed before its first event was
    # stored) told EVENTS_NOT_STORED and finding the log's last turn ended.
    assert result["dead_runs_ended"] + result["turns_void"] == 50 and result["next_turns_ok"] == 50, result
    assert result["events_lost"] == 0 and result["events_duplicated"] == 0, result
    assert result["runs_not_ended_once"] == 0, result

