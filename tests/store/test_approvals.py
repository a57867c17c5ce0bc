"""Approvals shared by policy replicas: get-or-create, compare-and-set with replay, listing, retention."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb

from services.common.errors import FailedPrecondition
from services.common.interceptors import error_info
from services.store.adapters.database import Database
from services.store.adapters.repository import SqlRepository
from services.store.core.models import ApprovalChange, ApprovalState, NewApproval
from tests.store.served import expect_error, store_replica, stub_for
from tests.support.waiting import wait_until

S = ApprovalState


def opening(approval_id: str, subject: str = "rm -rf build", session: str = "s1", ttl_ms: int = 1_000,
            tenant: str = "acme") -> NewApproval:
    return NewApproval(tenant, session, approval_id, subject, ttl_ms)


def change(approval_id: str, before: S, after: S, request_id: str = "", approver: str = "") -> ApprovalChange:
    return ApprovalChange("acme", "s1", approval_id, before, after, approver, request_id)


async def test_open_returns_the_pending_approval_until_it_expires(repo) -> None:
    first, created = await repo.open_approval(opening("a1"), 100)
    assert created and first.state is S.PENDING and first.expire_ms == 1_100
    again, created_again = await repo.open_approval(opening("a2"), 200)
    assert not created_again and again.approval_id == "a1"
    other_call, created_other = await repo.open_approval(opening("a3", subject="ls"), 200)
    assert created_other and other_call.approval_id == "a3"
    # Past its expiry the pending approval is as if never opened: a new one opens, the old one is gone.
    fresh, created_fresh = await repo.open_approval(opening("a4"), 1_100)
    assert created_fresh and fresh.approval_id == "a4"
    assert await repo.get_approval("acme", "s1", "a1", 1_100) is None
    assert (await repo.get_approval("acme", "s1", "a1", 1_099)).approval_id == "a1"
    listed = await repo.list_approvals("acme", "s1", None, None, 10, 1_100)
    assert [a.approval_id for a in listed] == ["a3", "a4"]


async def test_two_replicas_opening_the_same_call_at_once_get_one_pending_approval(db_url: str, database) -> None:
    # `database` migrated the schema; a second Database on the same URL is another store replica.
    other = Database(db_url)
    try:
        replicas = [SqlRepository(database), SqlRepository(other)]
        results = await asyncio.gather(*[replicas[i % 2].open_approval(opening(f"a{i}"), 1_000 + i)
                                         for i in range(16)])
    finally:
        await other.close()
    assert len({record.approval_id for record, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    pending = await SqlRepository(database).list_approvals("acme", "s1", S.PENDING, None, 10, 1_100)
    assert len(pending) == 1


async def test_decide_is_a_compare_and_set_and_a_retry_replays_it(repo) -> None:
    opened, _ = await repo.open_approval(opening("a1"), 100)
    approved, replayed = await repo.decide_approval(change("a1", S.PENDING, S.APPROVED_ONCE, "r1", "alice"), 200)
    assert (approved.state, approved.approver, approved.decided_request_id, replayed) == (
        S.APPROVED_ONCE, "alice", "r1", False)
    assert approved.change_seq > opened.change_seq

    # The same request again: nothing changes, it is a replay.
    retry, replayed = await repo.decide_approval(change("a1", S.PENDING, S.APPROVED_ONCE, "r1", "alice"), 300)
    assert replayed and retry == approved
    # A different answer loses: the state it found is named.
    with pytest.raises(FailedPrecondition) as err:
        await repo.decide_approval(change("a1", S.PENDING, S.DENIED, "r2", "bob"), 300)
    assert err.value.reason == "APPROVAL_STATE_CHANGED" and err.value.metadata["state"] == "approved_once"

    # A call uses the grant up (no approver: the recorded one stays).
    used, replayed = await repo.decide_approval(change("a1", S.APPROVED_ONCE, S.CONSUMED), 400)
    assert (used.state, used.approver, replayed) == (S.CONSUMED, "alice", False)
    assert used.change_seq > approved.change_seq
    # The answer's retry still replays, showing the approval as the answer left it.
    late_retry, replayed = await repo.decide_approval(change("a1", S.PENDING, S.APPROVED_ONCE, "r1", "alice"), 500)
    assert replayed and late_retry.state is S.APPROVED_ONCE
    with pytest.raises(FailedPrecondition):
        await repo.decide_approval(change("a1", S.APPROVED_ONCE, S.CONSUMED, "r3"), 500)  # used up once only
    stored = await repo.get_approval("acme", "s1", "a1", 600)
    assert stored.state is S.CONSUMED


async def test_concurrent_answers_one_wins(repo) -> None:
    await repo.open_approval(opening("a1"), 100)
    answers = [(S.APPROVED_ONCE, "alice"), (S.DENIED, "bob"), (S.APPROVED_SESSION, "carol"), (S.ABORTED, "dan")]
    results = await asyncio.gather(*[repo.decide_approval(change("a1", S.PENDING, state, f"r-{who}", who), 200)
                                     for state, who in answers], return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, FailedPrecondition) for r in results if isinstance(r, BaseException))
    record, _ = winners[0]
    assert (await repo.get_approval("acme", "s1", "a1", 300)).state is record.state


async def test_noting_the_audit_entry_is_a_change_and_a_retry_is_not(repo) -> None:
    await repo.open_approval(opening("a1"), 100)
    decided, _ = await repo.decide_approval(change("a1", S.PENDING, S.DENIED, "r1", "bob"), 200)
    noted, changed = await repo.note_approval_audit("acme", "s1", "a1", 17, 300)
    assert changed and noted.audit_seq == 17 and noted.change_seq > decided.change_seq
    again, changed = await repo.note_approval_audit("acme", "s1", "a1", 17, 400)
    assert not changed and again == noted
    assert await repo.note_approval_audit("acme", "other", "a1", 17, 400) == (None, False)


async def test_retention_deletes_old_approvals_but_not_a_pending_one_still_waiting(repo) -> None:
    await repo.open_approval(opening("old-answered"), 100)
    await repo.decide_approval(change("old-answered", S.PENDING, S.DENIED, "r1"), 150)
    await repo.open_approval(opening("old-expired", subject="b"), 100)
    await repo.open_approval(opening("old-waiting", subject="c", ttl_ms=1_000_000), 100)
    await repo.open_approval(opening("young", subject="d"), 5_000)
    assert await repo.delete_old_approvals(1_000, 5_000, 1) == 1
    assert await repo.delete_old_approvals(1_000, 5_000, 10) == 1
    assert await repo.delete_old_approvals(1_000, 5_000, 10) == 0
    remaining = await repo.list_approvals("acme", "s1", None, None, 10, 5_000)
    assert sorted(a.approval_id for a in remaining) == ["old-waiting", "young"]


# -- over gRPC, as the policy service calls it ---------------------------------


@pytest.fixture
async def policy(db_url: str, tmp_path: Path) -> AsyncIterator:
    async with store_replica(db_url, tmp_path / "store") as address, stub_for(address, "policy") as stub:
        yield stub


def open_request(subject: str = "rm -rf build", session: str = "s1", tenant: str = "acme",
                 ttl_ms: int = 60_000) -> pb.OpenApprovalRequest:
    return pb.OpenApprovalRequest(request_id=f"open-{subject.replace(' ', '_')}", tenant_id=tenant,
                                  session_id=session, subject_key=subject, ttl_ms=ttl_ms)


async def test_an_approval_of_another_session_or_tenant_answers_like_an_unknown_one(policy) -> None:
    opened = (await policy.OpenApproval(open_request())).approval
    assert opened.state == "pending" and opened.create_time.ToMilliseconds() > 0
    assert opened.expire_time.ToMilliseconds() - opened.create_time.ToMilliseconds() == 60_000
    got = await policy.GetApproval(pb.GetApprovalRequest(tenant_id="acme", session_id="s1",
                                                         approval_id=opened.approval_id))
    assert got.approval == opened
    for tenant, session, approval_id in (("acme", "s2", opened.approval_id), ("evil", "s1", opened.approval_id),
                                         ("acme", "s1", "no-such-id")):
        err = await expect_error(policy.GetApproval(pb.GetApprovalRequest(
            tenant_id=tenant, session_id=session, approval_id=approval_id)),
            grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND", "approval_id")
        assert approval_id in err.details()
        await expect_error(policy.DecideApproval(pb.DecideApprovalRequest(
            tenant_id=tenant, session_id=session, approval_id=approval_id, from_state="pending",
            to_state="denied")), grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND")
    # A pending approval past its expiry answers the same.
    short = (await policy.OpenApproval(open_request(subject="brief", ttl_ms=1))).approval

    async def expired() -> bool:
        try:
            await policy.GetApproval(pb.GetApprovalRequest(tenant_id="acme", session_id="s1",
                                                           approval_id=short.approval_id))
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND and error_info(exc).reason == "APPROVAL_NOT_FOUND"
        return False

    assert await wait_until(expired, 5.0)
    listed = await policy.ListApprovals(pb.ListApprovalsRequest(tenant_id="acme", session_id="s1"))
    assert [a.approval_id for a in listed.approvals] == [opened.approval_id]


async def test_decide_over_grpc_refuses_unknown_states_and_replays_retries(policy) -> None:
    opened = (await policy.OpenApproval(open_request())).approval
    base = dict(tenant_id="acme", session_id="s1", approval_id=opened.approval_id)
    for from_state, to_state, field in (("waiting", "denied", "from_state"), ("pending", "yes", "to_state"),
                                        ("", "denied", "from_state"), ("pending", "consumed", "to_state"),
                                        ("denied", "pending", "to_state")):
        await expect_error(policy.DecideApproval(pb.DecideApprovalRequest(
            request_id="bad", from_state=from_state, to_state=to_state, **base)),
            grpc.StatusCode.INVALID_ARGUMENT, field=field)
    decide = pb.DecideApprovalRequest(request_id="answer-1", from_state="pending", to_state="approved_session",
                                      approver="alice", **base)
    first = await policy.DecideApproval(decide)
    assert not first.replayed and first.approval.state == "approved_session"
    assert first.approval.decided_request_id == "answer-1" and first.approval.approver == "alice"
    retry = await policy.DecideApproval(decide)
    assert retry.replayed and retry.approval == first.approval
    err = await expect_error(policy.DecideApproval(pb.DecideApprovalRequest(
        request_id="answer-2", from_state="pending", to_state="denied", approver="bob", **base)),
        grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_STATE_CHANGED")
    assert "approved_session" in err.details()
    noted = await policy.NoteApprovalAudit(pb.NoteApprovalAuditRequest(audit_seq=9, **base))
    assert noted.approval.audit_seq == 9 and noted.approval.change_seq > first.approval.change_seq
    await expect_error(policy.NoteApprovalAudit(pb.NoteApprovalAuditRequest(audit_seq=0, **base)),
                       grpc.StatusCode.INVALID_ARGUMENT, field="audit_seq")
    # A new call of the same subject opens a new approval: the answered one is not pending.
    reopened = await policy.OpenApproval(open_request())
    assert reopened.created and reopened.approval.approval_id != opened.approval_id


async def test_open_validates_every_field(policy) -> None:
    cases = [
        (pb.OpenApprovalRequest(tenant_id="", session_id="s1", subject_key="x"), "tenant_id"),
        (pb.OpenApprovalRequest(tenant_id="acme", session_id="bad id", subject_key="x"), "session_id"),
        (pb.OpenApprovalRequest(tenant_id="acme", session_id="s1", subject_key=""), "subject_key"),
        (pb.OpenApprovalRequest(tenant_id="acme", session_id="s1", subject_key="a\x00b"), "subject_key"),
        (pb.OpenApprovalRequest(tenant_id="acme", session_id="s1", subject_key="x", ttl_ms=-1), "ttl_ms"),
        (pb.OpenApprovalRequest(request_id="no spaces", tenant_id="acme", session_id="s1", subject_key="x"),
         "request_id"),
    ]
    for request, field in cases:
        await expect_error(policy.OpenApproval(request), grpc.StatusCode.INVALID_ARGUMENT, field=field)
    listed = await policy.ListApprovals(pb.ListApprovalsRequest(tenant_id="acme", session_id="s1"))
    assert list(listed.approvals) == []
    await expect_error(policy.ListApprovals(pb.ListApprovalsRequest(tenant_id="acme", session_id="s1",
                                                                    state="maybe")),
                       grpc.StatusCode.INVALID_ARGUMENT, field="state")


async def test_list_pages_through_a_sessions_approvals_in_one_state(policy) -> None:
    ids = []
    for i in range(5):
        ids.append((await policy.OpenApproval(open_request(subject=f"cmd {i}"))).approval.approval_id)
    await policy.OpenApproval(open_request(subject="elsewhere", session="s2"))
    await policy.DecideApproval(pb.DecideApprovalRequest(request_id="d", tenant_id="acme", session_id="s1",
                                                         approval_id=ids[1], from_state="pending",
                                                         to_state="denied"))
    seen, token = [], ""
    while True:
        page = await policy.ListApprovals(pb.ListApprovalsRequest(tenant_id="acme", session_id="s1",
                                                                  state="pending", page_size=2, page_token=token))
        seen += [a.approval_id for a in page.approvals]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids[:1] + ids[2:]) and len(seen) == 4
    first = await policy.ListApprovals(pb.ListApprovalsRequest(tenant_id="acme", session_id="s1", page_size=2))
    await expect_error(policy.ListApprovals(pb.ListApprovalsRequest(
        tenant_id="acme", session_id="s2", page_size=2, page_token=first.next_page_token)),
        grpc.StatusCode.INVALID_ARGUMENT, field="page_token")
    everything = await policy.ListApprovals(pb.ListApprovalsRequest(tenant_id="acme", session_id="s1"))
    assert len(everything.approvals) == 5


async def test_only_the_policy_service_may_call_the_approval_rpcs(db_url: str, tmp_path: Path) -> None:
    async with store_replica(db_url, tmp_path / "store") as address, stub_for(address, "orchestrator") as stub:
        await expect_error(stub.OpenApproval(open_request()), grpc.StatusCode.PERMISSION_DENIED, "RPC_NOT_ALLOWED")
        call = stub.WatchApprovals(pb.WatchApprovalsRequest(from_now=True))
        await expect_error(call.read(), grpc.StatusCode.PERMISSION_DENIED, "RPC_NOT_ALLOWED")


async def test_two_store_replicas_open_one_pending_approval_for_racing_calls(db_url: str, tmp_path: Path) -> None:
    async with store_replica(db_url, tmp_path / "a") as a, store_replica(db_url, tmp_path / "b") as b, \
            stub_for(a, "policy") as on_a, stub_for(b, "policy") as on_b:
        replies = await asyncio.gather(*[(on_a if i % 2 else on_b).OpenApproval(open_request(subject="deploy"))
                                         for i in range(12)])
    assert len({r.approval.approval_id for r in replies}) == 1
    assert sum(r.created for r in replies) == 1
