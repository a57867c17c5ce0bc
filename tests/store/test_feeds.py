"""WatchApprovals and WatchSessionControls: order, the live marker, and commits of another store replica."""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from llmesh.store.v1 import store_pb2 as pb

from services.store.core.feeds import APPROVALS_FEED, FEED_CHANNEL, follow_feed
from services.store.core.watch_hub import WatchHub
from tests.store.served import expect_error, new_session, store_replica, stub_for
from tests.support.waiting import wait_until

DEADLINE_S = 5.0


async def read(call):
    return await asyncio.wait_for(call.read(), DEADLINE_S)


def opening(subject: str, session: str = "s1") -> pb.OpenApprovalRequest:
    return pb.OpenApprovalRequest(tenant_id="acme", session_id=session, subject_key=subject, ttl_ms=60_000)


async def test_watch_approvals_replays_changes_in_order_after_the_live_marker(db_url: str, tmp_path: Path) -> None:
    async with store_replica(db_url, tmp_path / "store") as address, stub_for(address, "policy") as policy:
        a = (await policy.OpenApproval(opening("a"))).approval
        b = (await policy.OpenApproval(opening("b", session="s2"))).approval
        decided = (await policy.DecideApproval(pb.DecideApprovalRequest(
            request_id="d1", tenant_id="acme", session_id="s1", approval_id=a.approval_id, from_state="pending",
            to_state="approved_once", approver="alice"))).approval
        assert a.change_seq < b.change_seq < decided.change_seq

        replay = policy.WatchApprovals(pb.WatchApprovalsRequest())
        after_b = policy.WatchApprovals(pb.WatchApprovalsRequest(after_change_seq=b.change_seq))
        now = policy.WatchApprovals(pb.WatchApprovalsRequest(from_now=True))
        for call in (replay, after_b, now):
            live = await read(call)
            assert not live.HasField("approval") and live.change_seq == decided.change_seq
        # An approval changed twice shows once, as it is now, at its latest change.
        first, second = await read(replay), await read(replay)
        assert (first.approval, first.change_seq) == (b, b.change_seq)
        assert (second.approval, second.change_seq) == (decided, decided.change_seq)
        assert (await read(after_b)).approval == decided

        used = (await policy.DecideApproval(pb.DecideApprovalRequest(
            request_id="u1", tenant_id="acme", session_id="s1", approval_id=a.approval_id,
            from_state="approved_once", to_state="consumed"))).approval
        c = (await policy.OpenApproval(opening("c"))).approval
        for call in (replay, after_b, now):
            assert [(await read(call)).approval for _ in range(2)] == [used, c]
        # A replayed decision changes nothing, so nobody is told about it.
        replayed = await policy.DecideApproval(pb.DecideApprovalRequest(
            request_id="u1", tenant_id="acme", session_id="s1", approval_id=a.approval_id,
            from_state="approved_once", to_state="consumed"))
        assert replayed.replayed
        noted = (await policy.NoteApprovalAudit(pb.NoteApprovalAuditRequest(
            tenant_id="acme", session_id="s1", approval_id=a.approval_id, audit_seq=4))).approval
        assert (await read(now)).approval == noted
        for call in (replay, after_b, now):
            call.cancel()
        await expect_error(policy.WatchApprovals(pb.WatchApprovalsRequest(after_change_seq=1, from_now=True)).read(),
                           grpc.StatusCode.INVALID_ARGUMENT, field="after_change_seq")


async def test_watches_see_changes_committed_through_another_store_replica(db_url: str, tmp_path: Path) -> None:
    # The watched replica's event re-read is off: only the feed poller can bring the other replica's rows.
    async with store_replica(db_url, tmp_path / "a", watch_recheck_ms=0, feed_recheck_ms=100) as a, \
            store_replica(db_url, tmp_path / "b") as b, \
            stub_for(a, "policy") as policy_a, stub_for(b, "policy") as policy_b, \
            stub_for(a, "orchestrator") as orch_a, stub_for(b, "orchestrator") as orch_b:
        await new_session(orch_b)
        approvals = policy_a.WatchApprovals(pb.WatchApprovalsRequest(from_now=True))
        controls = orch_a.WatchSessionControls(pb.WatchSessionControlsRequest(tenant_id="acme", session_id="s1",
                                                                              from_now=True))
        assert not (await read(approvals)).HasField("approval")
        assert not (await read(controls)).HasField("control")

        opened = (await policy_b.OpenApproval(opening("deploy"))).approval
        seen = await read(approvals)
        assert seen.approval == opened

        posted = (await orch_b.PostSessionControl(pb.PostSessionControlRequest(
            request_id="c1", control=pb.SessionControl(tenant_id="acme", session_id="s1", kind="cancel",
                                                       payload_json='{"reason": "user"}')))).control
        got = await read(controls)
        assert got.control == posted
        approvals.cancel()
        controls.cancel()


@dataclass(frozen=True)
class Row:
    seq: int


class FakeFeed:
    """A feed whose newest rows were deleted (by retention): its counter is past every row."""

    def __init__(self) -> None:
        self.rows = [Row(1), Row(2)]
        self.counter = 5
        self.num_reads = 0

    async def head(self) -> int:
        return self.counter

    async def read_after(self, seq: int, limit: int) -> Sequence[Row]:
        self.num_reads += 1
        await asyncio.sleep(0)  # a database read yields to the loop
        return [r for r in self.rows if r.seq > seq][:limit]


async def test_a_follower_does_not_spin_when_no_row_carries_the_newest_seq() -> None:
    hub, feed = WatchHub(), FakeFeed()
    got: list[tuple[Row | None, int]] = []

    async def follow() -> None:
        async for item in follow_feed(hub, APPROVALS_FEED, feed.head, feed.read_after, lambda r: r.seq, 0, False):
            got.append(item)

    task = asyncio.create_task(follow())
    assert await wait_until(lambda: len(got) == 3, DEADLINE_S)
    assert got == [(None, 5), (Row(1), 1), (Row(2), 2)]
    reads = feed.num_reads
    # Parked: however long the loop runs, it reads nothing until another commit is published.
    for _ in range(50):
        await asyncio.sleep(0)
    assert feed.num_reads == reads
    feed.rows.append(Row(6))
    feed.counter = 6
    hub.publish(FEED_CHANNEL, APPROVALS_FEED, 6)
    assert await wait_until(lambda: len(got) == 4, DEADLINE_S)
    assert got[-1] == (Row(6), 6) and feed.num_reads == reads + 1
    hub.close()
    await asyncio.wait_for(task, DEADLINE_S)
