"""Several replicas on one store: any replica may receive any call.

Two Orchestrators share one in-memory store (and one tools/policy fake, as
policy replicas share their approvals through the store): Cancel and
SubmitApproval reach a run on the other replica as session controls; a
replica whose lock changed hands can write nothing more; a replica that died
mid-turn has its turn ended by the next replica to touch the session.
"""
from __future__ import annotations

import asyncio

import pytest

from services.common.errors import NotFound, Unavailable
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.event_hub import RunOwnershipLost
from services.orchestrator.core.ports import APPROVE_ONCE, CONTROL_CANCEL, ControlsLive, SessionControl
from services.orchestrator.core.recovery import REPLICA_LOST, EventsNotStored
from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.builders import collect
from tests.orchestrator.fakes import Gate, call
from tests.orchestrator.replicas import Clock, Severable, two_replicas, until_terminal
from tests.support.waiting import wait_until

TENANT = "acme"
# Bound on every wait for something another task makes true.
DEADLINE_S = 10.0


def assert_gapless_once(events) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), [(e.seq, e.type) for e in events]


async def stored(store: MemoryStore, session_id: str):
    return await store.read_events(tenant_id=TENANT, session_id=session_id, after_seq=0)


async def test_cancel_through_the_other_replica_stops_the_run():
    gate = Gate("never sent")
    async with two_replicas([gate, "after cancel"]) as pair:
        session = await pair.a.session()
        sid = session.session_id
        run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                    user_message="slow")
        await gate.reached.wait()
        assert await pair.b.orchestrator.cancel(TENANT, sid, request_id="c1"), "a turn is going (on replica a)"
        live = await asyncio.wait_for(collect(events), DEADLINE_S)
        assert live[-1].type == "final" and live[-1].body["reason"] == "cancelled"
        await run.done.wait()
        assert not await pair.b.orchestrator.cancel(TENANT, sid), "no turn is going any more"
        assert not await pair.a.orchestrator.cancel(TENANT, sid)
        assert [(e.seq, e.type) for e in await stored(pair.store, sid)] == [(e.seq, e.type) for e in live]
        # The session goes on, on either replica.
        _r, events = await pair.a.orchestrator.run(request_id="r2", tenant_id=TENANT, session_id=sid,
                                                   user_message="next")
        assert (await collect(events))[-1].body["text"] == "after cancel"


async def test_cancel_answers_true_while_the_turn_goes_on_and_false_for_another_run_here():
    gate = Gate("never sent")
    async with two_replicas([gate]) as pair:
        sid = (await pair.a.session()).session_id
        run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                    user_message="slow")
        await gate.reached.wait()
        assert not await pair.a.orchestrator.cancel(TENANT, sid, run_id="some-other-run")
        assert not run.token.cancelled
        assert await pair.a.orchestrator.cancel(TENANT, sid, run_id=run.spec.run_id)
        # Repeated while the turn still holds the session: the same answer, here and through the other replica.
        assert await pair.a.orchestrator.cancel(TENANT, sid)
        assert await pair.b.orchestrator.cancel(TENANT, sid)
        assert (await asyncio.wait_for(collect(events), DEADLINE_S))[-1].body["reason"] == "cancelled"
        await run.done.wait()
        with pytest.raises(NotFound):
            await pair.b.orchestrator.cancel(TENANT, "no-such-session")


async def test_approval_submitted_through_the_other_replica_unblocks_the_call():
    command = call("shell", command="rm -rf build")
    async with two_replicas([command, "removed"]) as pair:
        sid = (await pair.a.session()).session_id
        _run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                     user_message="clean")
        seen = []
        async for event in events:
            seen.append(event)
            if event.type == "approval_required":
                approval_id = event.body["approval_id"]
                assert not pair.tools.executed, "the call must not run before approval"
                assert await pair.b.orchestrator.submit_approval(
                    request_id="x1", tenant_id=TENANT, session_id=sid, approval_id=approval_id,
                    decision=APPROVE_ONCE, approver="ops")
                # A retry of the same submission, and a repeat, are answered without asking again.
                assert await pair.b.orchestrator.submit_approval(
                    request_id="x1", tenant_id=TENANT, session_id=sid, approval_id=approval_id,
                    decision=APPROVE_ONCE, approver="ops")
        assert [e.type for e in seen] == ["turn_started", "tool_call", "approval_required", "tool_result", "token",
                                          "final"]
        assert [c.name for c in pair.tools.executed] == ["shell"]
        # Policy recorded it once, through the replica that received it.
        assert pair.b.policy.recorded == [(approval_id, APPROVE_ONCE)] and pair.a.policy.recorded == []
        # A late repeat through the replica that ran the turn is answered too.
        assert await pair.a.orchestrator.submit_approval(
            request_id="x2", tenant_id=TENANT, session_id=sid, approval_id=approval_id, decision=APPROVE_ONCE,
            approver="ops")


async def test_an_approval_nobody_waits_for_is_not_found_and_not_recorded():
    command = call("shell", command="reboot")
    async with two_replicas([command, "done"]) as pair:
        sid = (await pair.a.session()).session_id
        with pytest.raises(NotFound) as err:
            await pair.b.orchestrator.submit_approval(request_id="x", tenant_id=TENANT, session_id=sid,
                                                      approval_id="ap-404", decision=APPROVE_ONCE, approver="ops")
        assert err.value.reason == "APPROVAL_NOT_FOUND"
        # With a turn going on replica a, an id unknown to policy is still NOT_FOUND through b.
        _run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                     user_message="reboot")
        async for event in events:
            if event.type == "approval_required":
                with pytest.raises(NotFound):
                    await pair.b.orchestrator.submit_approval(request_id="y", tenant_id=TENANT, session_id=sid,
                                                              approval_id="ap-404", decision=APPROVE_ONCE,
                                                              approver="ops")
                await pair.b.orchestrator.submit_approval(request_id="z", tenant_id=TENANT, session_id=sid,
                                                          approval_id=event.body["approval_id"],
                                                          decision=APPROVE_ONCE, approver="ops")
        assert pair.b.policy.recorded == [("ap-1", APPROVE_ONCE)]


async def test_a_stale_owners_append_is_refused_and_its_run_stops_writing():
    async def stuck_read(_args: dict) -> str:
        await asyncio.Event().wait()  # until the run is stopped
        return "never"

    gate = Gate(call("fs_read", path="notes.txt"))
    async with two_replicas([gate], ["b answers"]) as pair:
        pair.tools.handlers["fs_read"] = stuck_read
        sid = (await pair.a.session()).session_id
        run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                    user_message="read notes")
        await gate.reached.wait()

        async def user_turn_stored() -> bool:
            messages = await pair.store.list_messages(tenant_id=TENANT, session_id=sid, after_position=0)
            return bool(await stored(pair.store, sid)) and bool(messages)

        assert await wait_until(user_turn_stored, DEADLINE_S)
        # Replica a stalls past its lease (no renewal reaches the store); replica b takes the session.
        pair.clock.now += RunLimits().lock_lease_ms / 1000.0 + 1
        run_b, events_b = await pair.b.orchestrator.run(request_id="r2", tenant_id=TENANT, session_id=sid,
                                                        user_message="take over")
        live_b = await asyncio.wait_for(collect(events_b), DEADLINE_S)
        await run_b.done.wait()
        # a wakes up: its tool call goes out live, and its store write is refused.
        gate.release.set()
        seen_on_a = []
        with pytest.raises(RunOwnershipLost) as lost:
            await asyncio.wait_for(until_terminal(events, seen_on_a), DEADLINE_S)
        assert lost.value.last_stored_seq == 1
        await asyncio.wait_for(run.done.wait(), DEADLINE_S)
        assert run.lease.fenced and run.result.reason == "aborted"
        assert pair.a.orchestrator.runs.num_fenced_runs == 1
        assert [e.type for e in seen_on_a] == ["turn_started", "tool_call"], "nothing more after the refusal"
        log = await stored(pair.store, sid)
        assert_gapless_once(log)
        assert [(e.type, e.run_id) for e in log] == [
            ("turn_started", run.spec.run_id), ("error", run.spec.run_id),
            *[(e.type, run_b.spec.run_id) for e in live_b]]
        assert log[1].body["reason"] == REPLICA_LOST
        messages = await pair.store.list_messages(tenant_id=TENANT, session_id=sid, after_position=0)
        assert [(m.role, m.content) for m in messages] == [("user", "read notes"), ("user", "take over"),
                                                            ("assistant", "b answers")]
        assert not pair.tools.executed, "the stopped run's tool call never completed"


async def die(pair, run) -> None:
    """Replica a stops: it reaches the store no more, its tasks are cancelled, its lock is never released."""
    severed = pair.a.store
    assert isinstance(severed, Severable)
    severed.severed = True
    await pair.a.orchestrator.controls.close()
    run.task.cancel()
    await asyncio.wait_for(run.done.wait(), DEADLINE_S)


async def test_a_dead_replicas_turn_is_ended_by_a_resume_on_the_other():
    clock = Clock()
    store = MemoryStore(clock=clock)
    gate = Gate("never sent")
    # b looks at a quiet turn's lock every 100 ms (a third of its lease).
    async with two_replicas([gate], ["the session goes on"], store=store, clock=clock, a_store=Severable(store),
                            b_limits=RunLimits(lock_lease_ms=300)) as pair:
        sid = (await pair.a.session()).session_id
        run, _events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                     user_message="go")
        await gate.reached.wait()
        assert await wait_until(lambda: stored(pair.store, sid), DEADLINE_S)
        follower = await pair.b.orchestrator.resume(TENANT, sid, 0)
        reader = asyncio.create_task(until_terminal(follower))
        await die(pair, run)
        held = await pair.store.acquire_session_lock(tenant_id=TENANT, session_id=sid, owner_id="probe",
                                                     lease_ms=1000)
        assert not held.acquired and held.holder_id == run.lease.owner_id, "a dead replica's lock stays held"
        assert not reader.done()
        clock.now += RunLimits().lock_lease_ms / 1000.0 + 1  # its lease runs out
        resumed = await asyncio.wait_for(reader, DEADLINE_S)
        assert [(e.type, e.run_id) for e in resumed] == [("turn_started", run.spec.run_id),
                                                         ("error", run.spec.run_id)]
        assert resumed[-1].body == {"reason": REPLICA_LOST, "message": resumed[-1].body["message"],
                                    "retryable": True}
        assert pair.b.orchestrator.recovery.num_dead_runs_ended == 1
        # A second Resume ends at once; the session goes on.
        again = await asyncio.wait_for(until_terminal(await pair.b.orchestrator.resume(TENANT, sid, 0)),
                                       DEADLINE_S)
        assert [e.seq for e in again] == [e.seq for e in resumed]
        _r, events = await pair.b.orchestrator.run(request_id="r2", tenant_id=TENANT, session_id=sid,
                                                   user_message="again")
        assert (await collect(events))[-1].body["text"] == "the session goes on"
        log = await stored(pair.store, sid)
        assert_gapless_once(log)
        assert [e.type for e in log].count("error") == 1 and pair.b.orchestrator.recovery.num_dead_runs_ended == 1


async def test_a_resume_past_the_stored_end_of_a_dead_turn_is_told_where_to_resume():
    # The dead replica showed its client events it never stored: that client's cursor is past the log.
    clock = Clock()
    store = MemoryStore(clock=clock)
    gate = Gate("never sent")
    async with two_replicas([gate], ["the session goes on"], store=store, clock=clock, a_store=Severable(store),
                            b_limits=RunLimits(lock_lease_ms=300)) as pair:
        sid = (await pair.a.session()).session_id
        run, _events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                     user_message="go")
        await gate.reached.wait()
        assert await wait_until(lambda: stored(pair.store, sid), DEADLINE_S)
        await die(pair, run)
        last_stored = (await stored(pair.store, sid))[-1].seq
        clock.now += RunLimits().lock_lease_ms / 1000.0 + 1  # its lease runs out
        ahead = await pair.b.orchestrator.resume(TENANT, sid, last_stored + 5)
        with pytest.raises(EventsNotStored) as told:
            await asyncio.wait_for(until_terminal(ahead), DEADLINE_S)
        # Resuming where it is told gives the rest of the log, ending with the dead run's end.
        resume_after = told.value.last_stored_seq
        assert told.value.field == "after_seq" and resume_after == last_stored
        rest = await asyncio.wait_for(until_terminal(await pair.b.orchestrator.resume(TENANT, sid, resume_after)),
                                      DEADLINE_S)
        assert [(e.type, e.body.get("reason")) for e in rest] == [("error", REPLICA_LOST)]
        assert_gapless_once(await stored(pair.store, sid))


async def test_a_dead_replicas_turn_is_ended_by_the_next_turn_on_the_other():
    clock = Clock()
    store = MemoryStore(clock=clock)
    gate = Gate("never sent")
    async with two_replicas([gate], ["b answers"], store=store, clock=clock, a_store=Severable(store)) as pair:
        sid = (await pair.a.session()).session_id
        run, _events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                     user_message="go")
        await gate.reached.wait()
        assert await wait_until(lambda: stored(pair.store, sid), DEADLINE_S)
        await die(pair, run)
        with pytest.raises(Exception) as busy:
            await pair.b.orchestrator.run(request_id="r2", tenant_id=TENANT, session_id=sid, user_message="now")
        assert getattr(busy.value, "reason", "") == "SESSION_BUSY", "while the lease lasts the turn may be alive"
        clock.now += RunLimits().lock_lease_ms / 1000.0 + 1
        run_b, events = await pair.b.orchestrator.run(request_id="r3", tenant_id=TENANT, session_id=sid,
                                                      user_message="now")
        live = await collect(events)
        await run_b.done.wait()
        log = await stored(pair.store, sid)
        assert_gapless_once(log)
        assert [(e.type, e.run_id) for e in log[:2]] == [("turn_started", run.spec.run_id),
                                                         ("error", run.spec.run_id)]
        assert [(e.seq, e.type) for e in log[2:]] == [(e.seq, e.type) for e in live]
        assert live[-1].body["text"] == "b answers"
        # Resume from the start sees both turns end, each event once.
        resumed = []
        async for event in await pair.b.orchestrator.resume(TENANT, sid, 0):
            resumed.append(event)
            if event.seq == log[-1].seq:
                break
        assert [(e.seq, e.type) for e in resumed] == [(e.seq, e.type) for e in log]


class BreakableControls(MemoryStore):
    """The in-memory store whose control watches break on request; later ones wait to be let in."""

    def __init__(self) -> None:
        super().__init__()
        self.break_watch = asyncio.Event()
        self.let_in = asyncio.Event()
        self.watches: list[dict] = []

    async def watch_session_controls(self, **kwargs):
        self.watches.append(kwargs)
        breakable = not self.break_watch.is_set()
        if not breakable:
            await self.let_in.wait()
        async for item in super().watch_session_controls(**kwargs):
            yield item
            if breakable and isinstance(item, ControlsLive):
                await self.break_watch.wait()
                raise Unavailable("store restarted")


async def test_controls_posted_while_the_watch_was_down_are_applied_after_it_reconnects():
    store = BreakableControls()
    gate = Gate("never sent")
    async with two_replicas([gate], store=store) as pair:
        sid = (await pair.a.session()).session_id
        run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                    user_message="slow")
        await gate.reached.wait()
        seen_before = pair.a.orchestrator.controls.cursor
        num_watches = len(store.watches)  # both replicas' first watches
        store.break_watch.set()
        assert await wait_until(lambda: len(store.watches) == num_watches + 2, DEADLINE_S), "both reconnect"
        assert await pair.b.orchestrator.cancel(TENANT, sid)
        store.let_in.set()
        assert (await asyncio.wait_for(collect(events), DEADLINE_S))[-1].body["reason"] == "cancelled"
        await run.done.wait()
        resumed_from = [w for w in store.watches[num_watches:] if w["after_seq"] == seen_before]
        assert resumed_from and not any(w["from_now"] for w in store.watches[num_watches:])


async def test_a_late_cancel_meant_for_an_earlier_lock_holder_does_not_stop_a_new_turn():
    gate = Gate("finished")
    async with two_replicas([gate]) as pair:
        sid = (await pair.a.session()).session_id
        run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                    user_message="go")
        await gate.reached.wait()
        late = SessionControl(tenant_id=TENANT, session_id=sid, kind=CONTROL_CANCEL,
                              payload={"reason": "cancelled by request", "holder_id": "an-earlier-run"})
        assert not pair.a.orchestrator.controls.apply(late)
        meant = SessionControl(tenant_id=TENANT, session_id=sid, kind=CONTROL_CANCEL,
                               payload={"holder_id": run.lease.owner_id})
        gate.release.set()
        assert not run.token.cancelled
        assert (await collect(events))[-1].body["reason"] == "stop"
        await run.done.wait()
        assert not pair.a.orchestrator.controls.apply(meant), "the turn is over"


async def test_a_turn_waits_for_a_check_that_holds_the_lock_instead_of_failing():
    async with two_replicas(["answer"]) as pair:
        sid = (await pair.a.session()).session_id
        checker = "check:b:probe"
        assert (await pair.store.acquire_session_lock(tenant_id=TENANT, session_id=sid, owner_id=checker,
                                                      lease_ms=60_000)).acquired
        starting = asyncio.create_task(pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                               user_message="go"))
        assert await pair.store.release_session_lock(tenant_id=TENANT, session_id=sid, owner_id=checker)
        run, events = await asyncio.wait_for(starting, DEADLINE_S)
        assert (await collect(events))[-1].body["text"] == "answer"
