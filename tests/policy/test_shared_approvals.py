"""Approvals kept in the store: two policy replicas share them, and they outlive both."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, Unavailable
from services.policy.adapters.memory_audit_log import MemoryAuditLog
from services.policy.core.approvals import ApprovalChoice
from services.policy.core.audit import AuditRecord
from services.policy.core.rules import Decision, RiskLevel
from tests.policy.builders import shell_call, tool_call
from tests.policy.replicas import policy_replica, running_store, store_approval_book
from tests.support.waiting import wait_until

WATCH_LIVE_S = 10.0


async def test_a_session_grant_recorded_on_one_replica_is_honoured_by_the_other_at_once(tmp_path: Path) -> None:
    async with (running_store(tmp_path / "store") as store,
                policy_replica(store.target) as a, policy_replica(store.target) as b):
        asked = await a.service.evaluate(shell_call("make build"))
        assert asked.verdict.decision is Decision.PROMPT
        # b answers the same pending request: it is one request, wherever it is asked.
        assert (await b.service.evaluate(shell_call("make build"))).approval_id == asked.approval_id
        await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana",
                                        "r1")
        # No waiting for b's watch: b checks with the store before it would ask again.
        on_b = await b.service.evaluate(shell_call("make  'build'"))
        assert on_b.verdict.decision is Decision.ALLOW and on_b.approved_by_cache and not on_b.approval_id
        other_session = await b.service.evaluate(shell_call("make build", session="s2"))
        assert other_session.verdict.decision is Decision.PROMPT


async def test_the_watch_brings_grants_into_every_replicas_cache(tmp_path: Path) -> None:
    async with (running_store(tmp_path / "store") as store,
                policy_replica(store.target) as a, policy_replica(store.target) as b):
        await asyncio.wait_for(b.approvals.watch_live.wait(), WATCH_LIVE_S)
        asked = await a.service.evaluate(shell_call("make build"))
        assert not b.approvals.grants.covers("acme", "s1", asked.verdict.subject_key)
        await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana",
                                        "r1")
        assert await wait_until(lambda: b.approvals.grants.covers("acme", "s1", asked.verdict.subject_key),
                                timeout_s=10.0)
        assert b.approvals.num_held == 1


async def test_an_approve_once_grant_used_on_one_replica_cannot_be_used_on_the_other(tmp_path: Path) -> None:
    async with (running_store(tmp_path / "store") as store,
                policy_replica(store.target) as a, policy_replica(store.target) as b):
        asked = await a.service.evaluate(shell_call("make build"))
        await b.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "r1")
        used = await a.service.evaluate(shell_call("make build"), approval_id=asked.approval_id)
        assert used.verdict.decision is Decision.ALLOW and "ana" in used.verdict.justification
        again = await b.service.evaluate(shell_call("make build"), approval_id=asked.approval_id)
        assert again.verdict.decision is Decision.FORBIDDEN
        assert again.verdict.justification == "the approval was already used"


async def test_replicas_racing_for_one_approve_once_grant_let_one_call_through(tmp_path: Path) -> None:
    async with (running_store(tmp_path / "store") as store,
                policy_replica(store.target) as a, policy_replica(store.target) as b):
        asked = await a.service.evaluate(shell_call("make build"))
        await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "r1")
        results = await asyncio.gather(
            *(replica.service.evaluate(shell_call("make build"), approval_id=asked.approval_id)
              for replica in (a, b, a, b)))
        decisions = sorted(r.verdict.decision.name for r in results)
        assert decisions == ["ALLOW", "FORBIDDEN", "FORBIDDEN", "FORBIDDEN"]
        assert all(r.verdict.justification == "the approval was already used"
                   for r in results if r.verdict.decision is Decision.FORBIDDEN)


async def test_approvals_outlive_both_replicas(tmp_path: Path) -> None:
    async with running_store(tmp_path / "store") as store:
        async with policy_replica(store.target) as a, policy_replica(store.target) as b:
            granted = await a.service.evaluate(shell_call("make build"))
            answered = await b.service.record_approval("acme", "s1", granted.approval_id,
                                                       ApprovalChoice.APPROVE_SESSION, "ana", "r1")
            waiting = await a.service.evaluate(shell_call("make deploy"))
            once = await b.service.evaluate(shell_call("make test"))
            await a.service.record_approval("acme", "s1", once.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "r2")

        async with policy_replica(store.target) as a, policy_replica(store.target) as b:
            again = await b.service.evaluate(shell_call("make build"))
            assert again.verdict.decision is Decision.ALLOW and again.approved_by_cache
            # The request still waiting is the same one, and can still be answered.
            assert (await a.service.evaluate(shell_call("make deploy"))).approval_id == waiting.approval_id
            await b.service.record_approval("acme", "s1", waiting.approval_id, ApprovalChoice.DENY, "bob", "r3")
            denied = await a.service.evaluate(shell_call("make deploy"), approval_id=waiting.approval_id)
            assert denied.verdict.decision is Decision.FORBIDDEN and "bob" in denied.verdict.justification
            used = await a.service.evaluate(shell_call("make test"), approval_id=once.approval_id)
            assert used.verdict.decision is Decision.ALLOW
            # A retry of an answer made before the restart is answered from the store, with no new entry.
            head = await a.audit_log.head("acme")
            retry = await b.service.record_approval("acme", "s1", granted.approval_id,
                                                    ApprovalChoice.APPROVE_SESSION, "ana", "r1")
            assert retry == answered
            assert await a.audit_log.head("acme") == head
            with pytest.raises(FailedPrecondition) as caught:
                await a.service.record_approval("acme", "s1", granted.approval_id, ApprovalChoice.DENY, "eve", "r4")
            assert caught.value.reason == "APPROVAL_ALREADY_ANSWERED"
            assert (await a.service.verify_audit("acme")).ok


async def test_an_answer_whose_audit_entry_failed_is_audited_by_its_retry(tmp_path: Path) -> None:
    log = _FailingAuditLog()
    async with running_store(tmp_path / "store") as store, policy_replica(store.target, audit_log=log) as a:
        asked = await a.service.evaluate(shell_call("make build"))
        log.fail_next = True
        with pytest.raises(Unavailable):
            await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE, "ana", "r1")
        # The answer was made; its retry writes the missing entry, once.
        first = await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE,
                                                "ana", "r1")
        second = await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_ONCE,
                                                 "ana", "r1")
        assert first == second and first.choice is ApprovalChoice.APPROVE_ONCE
        entries = [json.loads(r.payload_json) for r in log.rows["acme"]]
        assert [e["type"] for e in entries] == ["evaluate", "approval"]
        assert entries[1]["approval_id"] == asked.approval_id and first.audit_seq == 2


async def test_calls_that_need_the_store_fail_unavailable_while_it_is_down(tmp_path: Path) -> None:
    async with running_store(tmp_path / "store") as store:
        target = store.target
        async with policy_replica(target, audit_log=MemoryAuditLog()) as a:
            asked = await a.service.evaluate(shell_call("make build"))
            await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana",
                                            "r1")
    # The store is gone; this replica's channel points at nothing now.
    async with policy_replica(target, audit_log=MemoryAuditLog()) as b:
        with pytest.raises(Unavailable) as caught:
            await b.service.evaluate(shell_call("make build"))
        assert caught.value.reason == "APPROVAL_STORE_FAILED"
        with pytest.raises(Unavailable):
            await b.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.DENY, "bob", "r2")
        # A call that needs no approval is still judged.
        assert (await b.service.evaluate(shell_call("ls"))).verdict.decision is Decision.ALLOW


async def test_calls_with_keys_too_long_for_the_store_are_shared_by_digest(tmp_path: Path) -> None:
    call = tool_call("web_search", {"q": "x" * 100_000}, risk=RiskLevel.WRITE)
    async with (running_store(tmp_path / "store") as store,
                policy_replica(store.target) as a, policy_replica(store.target) as b):
        asked = await a.service.evaluate(call)
        assert (await b.service.evaluate(call)).approval_id == asked.approval_id
        request_id = "an id the store would refuse: " + "z" * 200
        answered = await b.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION,
                                                   "ana", request_id)
        assert await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION,
                                               "ana", request_id) == answered
        allowed = await a.service.evaluate(call)
        assert allowed.verdict.decision is Decision.ALLOW and allowed.approved_by_cache


async def test_the_grant_cache_is_bounded(tmp_path: Path) -> None:
    async with (running_store(tmp_path / "store") as store, policy_replica(store.target) as a,
                store_approval_book(store.target, max_cached_grants=2, watch=False) as small):
        for i in range(4):
            asked = await a.service.evaluate(shell_call(f"make target{i}"))
            await a.service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana",
                                            f"r{i}")
            assert await small.session_allows("acme", "s1", asked.verdict.subject_key)
        assert small.num_held == 2


class _FailingAuditLog(MemoryAuditLog):
    """A memory audit log whose next append fails as a store that went away would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    async def append(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        if self.fail_next:
            self.fail_next = False
            raise Unavailable("audit store: down", reason="AUDIT_STORE_FAILED")
        return await super().append(records)
