"""The orchestrator's store port, as a contract every implementation keeps.

`StoreContract` holds the cases; a test module subclasses it and provides a
`store` fixture (a StorePort, fresh per test) built with `CONTRACT_TIMING`.
Timing cases assert lower bounds only (a retry never comes before its
backoff, a lease never lapses before its length); upper bounds are generous
deadlines, so a loaded machine slows them down without failing them.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.ports import MessageRecord, StorePort, TaskRecord
from tests.support.waiting import wait_until

TENANT = "acme"
OTHER_TENANT = "globex"
# Generous: how long a condition another party makes true (a sweeper, a lease running out) may take.
DEADLINE_S = 20.0
# Clocks count whole milliseconds on one side and floats on the other.
SLACK_S = 0.005


@dataclass(frozen=True)
class ContractTiming:
    """The settings every store under contract is built with."""

    default_max_attempts: int = 5
    backoff_base_ms: int = 200
    backoff_max_ms: int = 300_000
    # How often the real store sweeps expired leases back to the queue.
    lease_sweep_interval_ms: int = 50


CONTRACT_TIMING = ContractTiming()
BACKOFF_S = CONTRACT_TIMING.backoff_base_ms / 1000.0


def event(type_: str, text: str = "", run_id: str = "run-1") -> AgentEvent:
    return AgentEvent(session_id="", run_id=run_id, type=type_, body={"text": text})


async def new_session(store: StorePort, tenant_id: str = TENANT, **kwargs) -> str:
    kwargs.setdefault("request_id", "")
    kwargs.setdefault("title", "t")
    kwargs.setdefault("metadata", {})
    return (await store.create_session(tenant_id=tenant_id, **kwargs)).session_id


async def enqueue(store: StorePort, queue: str, *, key: str = "", max_attempts: int = 3, priority: int = 0,
                  payload: str = '{"n": 1}', tenant_id: str = TENANT) -> TaskRecord:
    return await store.enqueue_task(request_id="", tenant_id=tenant_id, queue=queue, payload_json=payload,
                                    idempotency_key=key, max_attempts=max_attempts, priority=priority)


async def claim(store: StorePort, queue: str, worker_id: str = "w1", *, max_tasks: int = 10,
                lease_ms: int = 60_000) -> list[TaskRecord]:
    return await store.claim_tasks(queue=queue, worker_id=worker_id, max_tasks=max_tasks, lease_ms=lease_ms)


async def claim_when_ready(store: StorePort, queue: str, worker_id: str = "w1", **kwargs) -> list[TaskRecord]:
    claimed: list[TaskRecord] = []

    async def some() -> bool:
        claimed.extend(await claim(store, queue, worker_id, **kwargs))
        return bool(claimed)

    assert await wait_until(some, DEADLINE_S, interval_s=0.02), f"nothing in {queue} became claimable"
    return claimed


def a_queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


async def lock(store: StorePort, session_id: str, owner_id: str, lease_ms: int = 60_000):
    return await store.acquire_session_lock(tenant_id=TENANT, session_id=session_id, owner_id=owner_id,
                                            lease_ms=lease_ms)


async def unlock(store: StorePort, session_id: str, owner_id: str) -> bool:
    return await store.release_session_lock(tenant_id=TENANT, session_id=session_id, owner_id=owner_id)


class StoreContract:
    # ---- sessions ------------------------------------------------------------------------------
    async def test_created_session_reads_back_for_its_tenant_only(self, store: StorePort):
        created = await store.create_session(request_id="", tenant_id=TENANT, title="Plan",
                                             metadata={"model": "gemma", "tools": ["fs_read"]})
        got = await store.get_session(tenant_id=TENANT, session_id=created.session_id)
        assert (got.session_id, got.title, got.metadata) == (created.session_id, "Plan",
                                                             {"model": "gemma", "tools": ["fs_read"]})
        assert got.create_time > 0
        with pytest.raises(NotFound) as err:
            await store.get_session(tenant_id=OTHER_TENANT, session_id=created.session_id)
        assert err.value.reason == "SESSION_NOT_FOUND"

    async def test_retried_create_session_returns_the_same_session(self, store: StorePort):
        first = await new_session(store, request_id="create-1")
        again = await new_session(store, request_id="create-1")
        other = await new_session(store, request_id="create-2")
        assert first == again != other

    async def test_sessions_page_through_each_once_and_stay_in_their_tenant(self, store: StorePort):
        ids = {await new_session(store) for _ in range(5)}
        await new_session(store, OTHER_TENANT)
        seen, token, num_pages = [], "", 0
        while True:
            page, token = await store.list_sessions(tenant_id=TENANT, page_size=2, page_token=token)
            assert len(page) <= 2
            seen.extend(s.session_id for s in page)
            num_pages += 1
            if not token:
                break
        assert sorted(seen) == sorted(ids) and num_pages == 3

    async def test_a_page_token_of_another_tenant_is_refused(self, store: StorePort):
        for _ in range(3):
            await new_session(store)
        _page, token = await store.list_sessions(tenant_id=TENANT, page_size=1, page_token="")
        assert token
        with pytest.raises(InvalidArgument):
            await store.list_sessions(tenant_id=OTHER_TENANT, page_size=1, page_token=token)

    # ---- messages ------------------------------------------------------------------------------
    async def test_messages_get_positions_in_order_and_read_back_after_one(self, store: StorePort):
        sid = await new_session(store)
        first = await store.append_messages(request_id="m1", tenant_id=TENANT, session_id=sid, messages=[
            MessageRecord(role="user", content="hi", metadata={"k": "v"}, num_tokens=2),
            MessageRecord(role="assistant", content="hello", num_tokens=3)])
        second = await store.append_messages(request_id="m2", tenant_id=TENANT, session_id=sid, messages=[
            MessageRecord(role="user", content="again", num_tokens=1)])
        assert (first, second) == ([1, 2], [3])
        listed = await store.list_messages(tenant_id=TENANT, session_id=sid, after_position=0)
        assert [(m.position, m.role, m.content, m.metadata, m.num_tokens) for m in listed] == [
            (1, "user", "hi", {"k": "v"}, 2), (2, "assistant", "hello", {}, 3), (3, "user", "again", {}, 1)]
        later = await store.list_messages(tenant_id=TENANT, session_id=sid, after_position=2)
        assert [m.content for m in later] == ["again"]

    async def test_a_retried_message_append_adds_nothing(self, store: StorePort):
        sid = await new_session(store)
        messages = [MessageRecord(role="user", content="once")]
        first = await store.append_messages(request_id="m1", tenant_id=TENANT, session_id=sid, messages=messages)
        again = await store.append_messages(request_id="m1", tenant_id=TENANT, session_id=sid, messages=messages)
        assert first == again == [1]
        assert len(await store.list_messages(tenant_id=TENANT, session_id=sid, after_position=0)) == 1

    async def test_messages_of_an_unknown_session_or_role_are_refused(self, store: StorePort):
        sid = await new_session(store)
        with pytest.raises(NotFound):
            await store.append_messages(request_id="", tenant_id=TENANT, session_id="no-such-session",
                                        messages=[MessageRecord(role="user", content="x")])
        with pytest.raises(NotFound):
            await store.list_messages(tenant_id=OTHER_TENANT, session_id=sid, after_position=0)
        with pytest.raises(InvalidArgument):
            await store.append_messages(request_id="", tenant_id=TENANT, session_id=sid,
                                        messages=[MessageRecord(role="narrator", content="x")])
        assert await store.list_messages(tenant_id=TENANT, session_id=sid, after_position=0) == []

    # ---- events --------------------------------------------------------------------------------
    async def test_events_get_gapless_seqs_and_read_back_after_one(self, store: StorePort):
        sid = await new_session(store)
        first = await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                          events=[event("turn_started"), event("token", "a")],
                                          idempotency_keys=["k1", "k2"])
        second = await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                           events=[event("final", "done")], idempotency_keys=["k3"])
        assert (first, second) == ([1, 2], [3])
        stored = await store.read_events(tenant_id=TENANT, session_id=sid, after_seq=0)
        assert [(e.session_id, e.seq, e.type, e.run_id, e.body) for e in stored] == [
            (sid, 1, "turn_started", "run-1", {"text": ""}), (sid, 2, "token", "run-1", {"text": "a"}),
            (sid, 3, "final", "run-1", {"text": "done"})]
        assert [e.seq for e in await store.read_events(tenant_id=TENANT, session_id=sid, after_seq=2)] == [3]
        assert await store.read_events(tenant_id=TENANT, session_id=sid, after_seq=3) == []

    async def test_a_repeated_idempotency_key_returns_its_seq_without_a_duplicate(self, store: StorePort):
        sid = await new_session(store)
        await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                  events=[event("token", "a"), event("token", "b")], idempotency_keys=["a", "b"])
        again = await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                          events=[event("token", "b"), event("token", "c")],
                                          idempotency_keys=["b", "c"])
        assert again == [2, 3]
        stored = await store.read_events(tenant_id=TENANT, session_id=sid, after_seq=0)
        assert [e.body["text"] for e in stored] == ["a", "b", "c"]

    async def test_a_retried_request_without_keys_adds_nothing(self, store: StorePort):
        sid = await new_session(store)
        batch = [event("token", "a"), event("final", "b")]
        first = await store.append_events(request_id="req-1", tenant_id=TENANT, session_id=sid, events=batch,
                                          idempotency_keys=["", ""])
        again = await store.append_events(request_id="req-1", tenant_id=TENANT, session_id=sid, events=batch,
                                          idempotency_keys=["", ""])
        assert first == again == [1, 2]
        assert len(await store.read_events(tenant_id=TENANT, session_id=sid, after_seq=0)) == 2

    async def test_events_of_an_unknown_session_or_an_empty_batch_are_refused(self, store: StorePort):
        sid = await new_session(store)
        with pytest.raises(NotFound):
            await store.append_events(request_id="", tenant_id=TENANT, session_id="no-such-session",
                                      events=[event("token")], idempotency_keys=[""])
        with pytest.raises(NotFound):
            await store.read_events(tenant_id=OTHER_TENANT, session_id=sid, after_seq=0)
        with pytest.raises(InvalidArgument):
            await store.append_events(request_id="", tenant_id=TENANT, session_id=sid, events=[],
                                      idempotency_keys=[])

    async def test_watch_replays_after_its_seq_then_follows_new_events(self, store: StorePort):
        sid = await new_session(store)
        await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                  events=[event("token", "a"), event("token", "b")], idempotency_keys=["a", "b"])
        watch = store.watch_events(tenant_id=TENANT, session_id=sid, after_seq=1)
        try:
            replayed = await asyncio.wait_for(anext(watch), DEADLINE_S)
            assert (replayed.seq, replayed.body["text"]) == (2, "b")
            await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                      events=[event("final", "c")], idempotency_keys=["c"])
            live = await asyncio.wait_for(anext(watch), DEADLINE_S)
            assert (live.seq, live.type, live.body["text"]) == (3, "final", "c")
        finally:
            await watch.aclose()

    # ---- tasks ---------------------------------------------------------------------------------
    async def test_enqueued_task_is_ready_and_a_retried_enqueue_returns_it(self, store: StorePort):
        queue = a_queue()
        task = await enqueue(store, queue, key="job-1", payload='{"job": 1}')
        assert (task.state, task.attempts, task.tenant_id, task.payload_json) == ("READY", 0, TENANT, '{"job": 1}')
        assert (await enqueue(store, queue, key="job-1")).task_id == task.task_id
        assert (await enqueue(store, queue, key="job-1", tenant_id=OTHER_TENANT)).task_id != task.task_id
        by_request = [await store.enqueue_task(request_id="enq-1", tenant_id=TENANT, queue=queue, payload_json="{}",
                                               idempotency_key="", max_attempts=3) for _ in range(2)]
        assert by_request[0].task_id == by_request[1].task_id
        claimed = await claim(store, queue)
        assert len(claimed) == 3, "one task per tenant and key, and one per request"
        assert {t.tenant_id for t in claimed} == {TENANT, OTHER_TENANT}, "a queue serves every tenant"
        got = await store.get_task(tenant_id=TENANT, task_id=task.task_id)
        assert got.task_id == task.task_id
        with pytest.raises(NotFound):
            await store.get_task(tenant_id=OTHER_TENANT, task_id=task.task_id)

    async def test_a_task_that_is_not_json_is_refused(self, store: StorePort):
        with pytest.raises(InvalidArgument):
            await enqueue(store, a_queue(), payload="{not json")

    async def test_claim_leases_once_in_priority_order_from_its_queue_only(self, store: StorePort):
        queue = a_queue()
        low = await enqueue(store, queue, priority=5)
        high = await enqueue(store, queue, priority=0)
        await enqueue(store, a_queue())
        (first,) = await claim(store, queue, "w1", max_tasks=1)
        assert first.task_id == high.task_id
        assert (first.state, first.attempts, first.worker_id) == ("LEASED", 1, "w1") and first.lease_token
        (second,) = await claim(store, queue, "w2")
        assert second.task_id == low.task_id
        assert await claim(store, queue, "w3") == [], "leased tasks are not handed out twice"
        stored = await store.get_task(tenant_id=TENANT, task_id=high.task_id)
        assert (stored.state, stored.worker_id) == ("LEASED", "w1")

    async def test_a_cancelled_task_is_never_claimed_and_its_holder_loses_the_lease(self, store: StorePort):
        queue = a_queue()
        queued = await enqueue(store, queue)
        cancelled, previous = await store.cancel_task(tenant_id=TENANT, task_id=queued.task_id, reason="not needed")
        assert (previous, cancelled.state, cancelled.last_error) == ("READY", "CANCELLED", "not needed")
        assert await claim(store, queue) == [], "a cancelled task is never handed out"
        again, previous = await store.cancel_task(tenant_id=TENANT, task_id=queued.task_id, reason="twice")
        assert (previous, again.state, again.last_error) == ("CANCELLED", "CANCELLED", "not needed")

        await enqueue(store, queue)
        (held,) = await claim(store, queue)
        _, previous = await store.cancel_task(tenant_id=TENANT, task_id=held.task_id, reason="stop")
        assert previous == "LEASED"
        for call in (store.heartbeat_task(task_id=held.task_id, lease_token=held.lease_token, lease_ms=1000),
                     store.ack_task(task_id=held.task_id, lease_token=held.lease_token, result_json="{}"),
                     store.fail_task(task_id=held.task_id, lease_token=held.lease_token, error="x", permanent=False)):
            with pytest.raises(FailedPrecondition) as err:
                await call
            assert err.value.reason == "LEASE_LOST"
        assert (await store.get_task(tenant_id=TENANT, task_id=held.task_id)).state == "CANCELLED"

    async def test_only_the_tenants_unfinished_tasks_can_be_cancelled(self, store: StorePort):
        queue = a_queue()
        task = await enqueue(store, queue)
        with pytest.raises(NotFound):
            await store.cancel_task(tenant_id=OTHER_TENANT, task_id=task.task_id, reason="")
        with pytest.raises(NotFound):
            await store.cancel_task(tenant_id=TENANT, task_id="no-such-task", reason="")
        (held,) = await claim(store, queue)
        await store.ack_task(task_id=held.task_id, lease_token=held.lease_token, result_json="{}")
        with pytest.raises(FailedPrecondition) as err:
            await store.cancel_task(tenant_id=TENANT, task_id=held.task_id, reason="")
        assert (err.value.reason, err.value.field) == ("TASK_ENDED", "task_id")
        assert (await store.get_task(tenant_id=TENANT, task_id=held.task_id)).state == "DONE"

    async def test_claims_with_a_bad_lease_or_size_are_refused(self, store: StorePort):
        queue = a_queue()
        with pytest.raises(InvalidArgument):
            await claim(store, queue, lease_ms=0)
        with pytest.raises(InvalidArgument):
            await claim(store, queue, max_tasks=0)

    async def test_ack_stores_the_result_once_and_only_with_the_lease_token(self, store: StorePort):
        queue = a_queue()
        await enqueue(store, queue)
        (task,) = await claim(store, queue)
        with pytest.raises(FailedPrecondition) as err:
            await store.ack_task(task_id=task.task_id, lease_token="not-the-token", result_json="{}")
        assert err.value.reason == "LEASE_LOST"
        await store.ack_task(task_id=task.task_id, lease_token=task.lease_token, result_json='{"ok": true}')
        await store.ack_task(task_id=task.task_id, lease_token=task.lease_token, result_json='{"ok": true}')
        done = await store.get_task(tenant_id=TENANT, task_id=task.task_id)
        assert (done.state, done.result_json, done.attempts) == ("DONE", '{"ok": true}', 1)
        with pytest.raises(FailedPrecondition):
            await store.heartbeat_task(task_id=task.task_id, lease_token=task.lease_token, lease_ms=1000)
        with pytest.raises(NotFound):
            await store.ack_task(task_id="no-such-task", lease_token=task.lease_token, result_json="{}")

    async def test_a_failed_task_waits_out_its_backoff_and_retries_with_the_next_attempt(self, store: StorePort):
        queue = a_queue()
        await enqueue(store, queue, max_attempts=3)
        (task,) = await claim(store, queue)
        failed_at = time.monotonic()
        await store.fail_task(task_id=task.task_id, lease_token=task.lease_token, error="boom", permanent=False)
        # A retried fail changes nothing.
        await store.fail_task(task_id=task.task_id, lease_token=task.lease_token, error="boom", permanent=False)
        stored = await store.get_task(tenant_id=TENANT, task_id=task.task_id)
        assert (stored.state, stored.attempts, stored.last_error) == ("READY", 1, "boom")
        (retry,) = await claim_when_ready(store, queue, "w2")
        assert time.monotonic() - failed_at >= BACKOFF_S - SLACK_S, "retried before its backoff"
        assert (retry.task_id, retry.attempts, retry.worker_id) == (task.task_id, 2, "w2")
        with pytest.raises(FailedPrecondition):
            await store.ack_task(task_id=task.task_id, lease_token=task.lease_token, result_json="{}")
        # The second failure waits twice as long.
        failed_at = time.monotonic()
        await store.fail_task(task_id=retry.task_id, lease_token=retry.lease_token, error="boom", permanent=False)
        (third,) = await claim_when_ready(store, queue, "w3")
        assert time.monotonic() - failed_at >= 2 * BACKOFF_S - SLACK_S, "the backoff does not grow"
        assert third.attempts == 3

    async def test_a_task_dies_after_max_attempts_or_a_permanent_failure(self, store: StorePort):
        queue = a_queue()
        await enqueue(store, queue, max_attempts=2)
        (task,) = await claim(store, queue)
        await store.fail_task(task_id=task.task_id, lease_token=task.lease_token, error="one", permanent=False)
        (task,) = await claim_when_ready(store, queue)
        await store.fail_task(task_id=task.task_id, lease_token=task.lease_token, error="two", permanent=False)
        dead = await store.get_task(tenant_id=TENANT, task_id=task.task_id)
        assert (dead.state, dead.attempts, dead.last_error) == ("DEAD", 2, "two")
        await asyncio.sleep(3 * BACKOFF_S)
        assert await claim(store, queue) == [], "a dead task is never handed out again"

        await enqueue(store, queue, max_attempts=5)
        (task,) = await claim(store, queue)
        await store.fail_task(task_id=task.task_id, lease_token=task.lease_token, error="bad input", permanent=True)
        dead = await store.get_task(tenant_id=TENANT, task_id=task.task_id)
        assert (dead.state, dead.attempts) == ("DEAD", 1)

    async def test_an_expired_lease_goes_to_another_worker_and_voids_the_old_token(self, store: StorePort):
        queue = a_queue()
        await enqueue(store, queue, max_attempts=3)
        lease_s = 0.2
        claimed_at = time.monotonic()
        (first,) = await claim(store, queue, "w1", lease_ms=int(lease_s * 1000))
        (second,) = await claim_when_ready(store, queue, "w2")
        assert time.monotonic() - claimed_at >= lease_s - SLACK_S, "reclaimed before the lease ran out"
        assert (second.task_id, second.attempts, second.worker_id) == (first.task_id, 2, "w2")
        assert second.lease_token != first.lease_token
        for stale in (store.heartbeat_task(task_id=first.task_id, lease_token=first.lease_token, lease_ms=1000),
                      store.ack_task(task_id=first.task_id, lease_token=first.lease_token, result_json="{}")):
            with pytest.raises(FailedPrecondition) as err:
                await stale
            assert err.value.reason == "LEASE_LOST"
        await store.ack_task(task_id=second.task_id, lease_token=second.lease_token, result_json='"by w2"')
        done = await store.get_task(tenant_id=TENANT, task_id=first.task_id)
        assert (done.state, done.result_json) == ("DONE", '"by w2"')

    async def test_a_heartbeat_sets_the_lease_from_now(self, store: StorePort):
        queue = a_queue()
        await enqueue(store, queue)
        (task,) = await claim(store, queue, "w1", lease_ms=3_600_000)
        beat_at = time.monotonic()
        await store.heartbeat_task(task_id=task.task_id, lease_token=task.lease_token, lease_ms=200)
        (again,) = await claim_when_ready(store, queue, "w2")
        assert time.monotonic() - beat_at >= 0.2 - SLACK_S
        assert again.task_id == task.task_id and again.attempts == 2

    async def test_a_lease_that_expires_on_the_last_attempt_kills_the_task(self, store: StorePort):
        queue = a_queue()
        await enqueue(store, queue, max_attempts=1)
        (task,) = await claim(store, queue, lease_ms=100)

        async def dead() -> bool:
            await claim(store, queue, "w2")
            return (await store.get_task(tenant_id=TENANT, task_id=task.task_id)).state == "DEAD"

        assert await wait_until(dead, DEADLINE_S, interval_s=0.05)
        final = await store.get_task(tenant_id=TENANT, task_id=task.task_id)
        assert final.attempts == 1 and "lease expired" in final.last_error

    # ---- session locks -------------------------------------------------------------------------
    async def test_one_holder_at_a_time_and_the_holder_renews_under_the_same_token(self, store: StorePort):
        sid = await new_session(store)
        a = await lock(store, sid, "owner-a")
        assert a.acquired and a.next_event_seq == 1 and a.fencing_token > 0
        assert not (await lock(store, sid, "owner-b")).acquired
        renewed = await lock(store, sid, "owner-a")
        assert renewed.acquired and renewed.fencing_token == a.fencing_token

    async def test_the_grant_names_the_next_event_seq(self, store: StorePort):
        sid = await new_session(store)
        await store.append_events(request_id="", tenant_id=TENANT, session_id=sid,
                                  events=[event("turn_started"), event("final")], idempotency_keys=["1", "2"])
        assert (await lock(store, sid, "owner-a")).next_event_seq == 3

    async def test_releasing_a_lock_not_held_returns_false_and_changes_nothing(self, store: StorePort):
        sid = await new_session(store)
        assert await unlock(store, sid, "owner-a") is False, "nobody holds it"
        await lock(store, sid, "owner-a")
        assert await unlock(store, sid, "owner-b") is False, "someone else holds it"
        assert not (await lock(store, sid, "owner-b")).acquired
        assert await unlock(store, sid, "owner-a") is True
        assert await unlock(store, sid, "owner-a") is False, "already released"

    async def test_the_fencing_token_grows_by_one_each_time_the_lock_changes_hands(self, store: StorePort):
        # Runs rely on the step of one: a renewal two or more ahead means someone held the lock meanwhile.
        sid = await new_session(store)
        a = await lock(store, sid, "owner-a")
        assert await unlock(store, sid, "owner-a")
        b = await lock(store, sid, "owner-b")
        assert b.acquired and b.fencing_token == a.fencing_token + 1
        assert await unlock(store, sid, "owner-b")
        a_again = await lock(store, sid, "owner-a")
        assert a_again.acquired and a_again.fencing_token == a.fencing_token + 2

    async def test_a_lapsed_lock_goes_to_the_next_owner_with_a_greater_token(self, store: StorePort):
        sid = await new_session(store)
        taken_at = time.monotonic()
        a = await lock(store, sid, "owner-a", lease_ms=200)
        grants = []

        async def b_has_it() -> bool:
            grants.append(await lock(store, sid, "owner-b"))
            return grants[-1].acquired

        assert await wait_until(b_has_it, DEADLINE_S, interval_s=0.02)
        assert time.monotonic() - taken_at >= 0.2 - SLACK_S, "taken over before the lease ran out"
        assert grants[-1].fencing_token > a.fencing_token
        assert not (await lock(store, sid, "owner-a")).acquired, "the old holder cannot renew"
        assert await unlock(store, sid, "owner-a") is False

    async def test_renewing_after_the_lease_lapsed_returns_another_token(self, store: StorePort):
        sid = await new_session(store)
        a = await lock(store, sid, "owner-a", lease_ms=100)
        await asyncio.sleep(0.1 + 3 * CONTRACT_TIMING.lease_sweep_interval_ms / 1000)
        again = await lock(store, sid, "owner-a")
        assert again.acquired and again.fencing_token == a.fencing_token + 1, (
            "the lease lapsed, so someone could have held it meanwhile; one step says nobody did")

    async def test_a_lock_with_no_lease_is_refused(self, store: StorePort):
        sid = await new_session(store)
        with pytest.raises(InvalidArgument):
            await lock(store, sid, "owner-a", lease_ms=0)
