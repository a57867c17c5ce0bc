"""The run lifecycle: its phases, the moves between them, and the run's lease on the session lock."""
from __future__ import annotations

import asyncio
import itertools

import pytest

from services.common.errors import FailedPrecondition
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.lock_lease import LockLease
from services.orchestrator.core.ports import SessionLockGrant
from services.orchestrator.core.run_phase import NEXT_PHASES, IllegalTransition, RunPhase
from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.builders import collect, make_rig
from tests.orchestrator.fakes import Gate
from tests.support.waiting import wait_until

P = RunPhase
LEGAL = {
    (P.STARTING, P.RUNNING), (P.STARTING, P.DONE),
    (P.RUNNING, P.FINISHING),
    (P.FINISHING, P.HANDED_OVER), (P.FINISHING, P.RELEASING),
    (P.HANDED_OVER, P.DONE), (P.RELEASING, P.DONE),
}


# ---- the phases on their own -------------------------------------------------------------------
@pytest.mark.parametrize("source,target", sorted(LEGAL, key=lambda pair: (pair[0].value, pair[1].value)))
def test_each_legal_move_is_allowed(source: RunPhase, target: RunPhase):
    assert source.to(target) is target


@pytest.mark.parametrize("source,target", [
    (s, t) for s, t in itertools.product(RunPhase, RunPhase) if (s, t) not in LEGAL])
def test_every_other_move_raises(source: RunPhase, target: RunPhase):
    with pytest.raises(IllegalTransition) as err:
        source.to(target)
    assert source.value in str(err.value) and target.value in str(err.value)


def test_the_table_is_the_diagram_and_every_phase_reaches_done():
    assert {(s, t) for s, targets in NEXT_PHASES.items() for t in targets} == LEGAL
    for phase in RunPhase:
        reachable, frontier = {phase}, [phase]
        while frontier:
            for nxt in NEXT_PHASES[frontier.pop()]:
                if nxt not in reachable:
                    reachable.add(nxt)
                    frontier.append(nxt)
        assert P.DONE in reachable, f"{phase} can never finish"


def test_the_turn_is_over_once_the_last_event_is_out():
    assert [p for p in RunPhase if p.turn_is_over] == [P.FINISHING, P.HANDED_OVER, P.RELEASING, P.DONE]


# ---- the lease ---------------------------------------------------------------------------------
def test_a_lease_holds_while_renewals_keep_its_token_or_show_only_its_own_lapse():
    lease = LockLease.granted("run-1", SessionLockGrant(acquired=True, next_event_seq=4, fencing_token=7))
    assert (lease.owner_id, lease.next_event_seq, lease.fencing_token, lease.inherited) == ("run-1", 4, 7, False)
    assert lease.renewed(SessionLockGrant(acquired=True, fencing_token=7))
    # It lapsed and this owner took it again before anyone else: nobody else wrote meanwhile.
    assert lease.renewed(SessionLockGrant(acquired=True, fencing_token=8))
    assert lease.fencing_token == 8 and not lease.lost


def test_a_lease_is_lost_when_refused_or_when_another_owner_held_the_lock_meanwhile():
    refused = LockLease.granted("run-1", SessionLockGrant(acquired=True, fencing_token=3))
    assert not refused.renewed(SessionLockGrant(acquired=False, fencing_token=4))
    assert refused.lost
    overtaken = LockLease.granted("run-1", SessionLockGrant(acquired=True, fencing_token=3))
    assert not overtaken.renewed(SessionLockGrant(acquired=True, fencing_token=5))
    assert overtaken.lost


def test_a_store_without_fencing_tokens_only_refuses():
    lease = LockLease.granted("run-1", SessionLockGrant(acquired=True))
    assert lease.renewed(SessionLockGrant(acquired=True)) and not lease.lost


def test_a_lease_passed_on_keeps_the_owner_and_token_and_continues_the_seqs():
    lease = LockLease.granted("run-1", SessionLockGrant(acquired=True, next_event_seq=1, fencing_token=2))
    inherited = lease.passed_on(next_event_seq=9)
    assert (inherited.owner_id, inherited.fencing_token, inherited.next_event_seq, inherited.inherited) == (
        "run-1", 2, 9, True)


# ---- runs going through the phases -------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class GrantLog(MemoryStore):
    """The in-memory store on a clock the test moves, keeping every lock grant it gave."""

    def __init__(self) -> None:
        self.clock = Clock()
        super().__init__(clock=self.clock)
        self.grants: list[SessionLockGrant] = []

    async def acquire_session_lock(self, **kw):
        grant = await super().acquire_session_lock(**kw)
        self.grants.append(grant)
        return grant


async def test_a_run_goes_from_running_to_done_and_frees_its_session():
    gate = Gate("answer")
    rig = make_rig([gate])
    session = await rig.session()
    run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                             user_message="go")
    await gate.reached.wait()
    assert run.phase is P.RUNNING and rig.orchestrator.runs.active_run(session.session_id) is run
    gate.release.set()
    assert (await collect(events))[-1].body["reason"] == "stop"
    await run.done.wait()
    assert run.phase is P.DONE and rig.orchestrator.runs.active_run(session.session_id) is None
    other = await rig.store.acquire_session_lock(tenant_id="acme", session_id=session.session_id, owner_id="x",
                                                 lease_ms=1000)
    assert other.acquired, "a done run has given its lock back"


async def test_a_start_that_cannot_get_the_lock_leaves_the_session_free():
    rig = make_rig(["later"])
    session = await rig.session()
    await rig.store.acquire_session_lock(tenant_id="acme", session_id=session.session_id, owner_id="elsewhere",
                                         lease_ms=60_000)
    with pytest.raises(FailedPrecondition) as err:
        await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                   user_message="go")
    assert err.value.reason == "SESSION_BUSY"
    assert rig.orchestrator.runs.num_active == 0
    assert await rig.store.release_session_lock(tenant_id="acme", session_id=session.session_id,
                                                owner_id="elsewhere")
    _run, events = await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                              user_message="go")
    assert (await collect(events))[-1].body["text"] == "later"


async def test_the_next_turn_takes_over_a_finishing_run_which_then_never_releases():
    store = MemoryStore()
    rig = make_rig(["one", "two"], store=store)
    session = await rig.session()
    held = asyncio.Event()
    real_append = store.append_events

    async def slow_append(**kw):
        await held.wait()
        return await real_append(**kw)

    store.append_events = slow_append  # type: ignore[method-assign]
    first, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                               user_message="one")
    await collect(events)
    assert first.phase is P.FINISHING, "its last event is out, its events are not stored"
    second, events = await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                                user_message="two")
    assert first.phase is P.HANDED_OVER
    assert second.lease.inherited and second.lease.owner_id == first.lease.owner_id
    held.set()
    await collect(events)
    await first.done.wait()
    await second.done.wait()
    assert (first.phase, second.phase) == (P.DONE, P.DONE)
    assert not await store.release_session_lock(tenant_id="acme", session_id=session.session_id,
                                                owner_id=first.lease.owner_id), "the last run let it go"


async def test_a_renewal_after_its_own_lapse_keeps_the_run_going():
    store = GrantLog()
    gate = Gate("finished")
    rig = make_rig([gate], store=store, limits=RunLimits(lock_lease_ms=90))
    session = await rig.session()
    run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                             user_message="go")
    await gate.reached.wait()
    token = run.lease.fencing_token
    store.clock.now += 60  # the lease lapses in the store's eyes; nobody takes the lock
    assert await wait_until(lambda: run.lease.fencing_token == token + 1, 10)
    gate.release.set()
    final = (await collect(events))[-1]
    assert final.body["reason"] == "stop" and not run.lease.lost


async def test_a_run_whose_lock_another_owner_held_meanwhile_is_aborted():
    store = GrantLog()
    gate = Gate("never sent")
    rig = make_rig([gate], store=store, limits=RunLimits(lock_lease_ms=90))
    session = await rig.session()
    run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                             user_message="go")
    await gate.reached.wait()

    async def started_is_stored() -> bool:
        return bool(await store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0))

    assert await wait_until(started_is_stored)
    # The lease lapses; another replica takes the session and lets it go before this run renews.
    store.clock.now += 60
    other = await store.acquire_session_lock(tenant_id="acme", session_id=session.session_id, owner_id="replica-b",
                                             lease_ms=1000)
    assert other.acquired
    assert await store.release_session_lock(tenant_id="acme", session_id=session.session_id, owner_id="replica-b")
    final = (await asyncio.wait_for(collect(events), 10))[-1]
    assert final.type == "final" and final.body["reason"] == "aborted"
    await run.done.wait()
    assert run.lease.lost and run.phase is P.DONE
    # Its writes carry the old fencing token: the store took nothing of it after the lock changed hands.
    stored = await store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    assert [e.type for e in stored] == ["turn_started"] and run.lease.fenced
    assert rig.orchestrator.runs.num_fenced_runs == 1
