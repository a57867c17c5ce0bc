"""The durable task queue: background runs, worker cap, crash recovery."""
from __future__ import annotations

import asyncio

from services.common.errors import Unavailable
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.builders import make_rig
from tests.orchestrator.fakes import Gate, ScriptedInference
from tests.support.waiting import wait_until


async def wait_for_state(rig, task_id: str, state: str, timeout_s: float = 10.0):
    """The task's view once it is in ``state``; fails the test if it never gets there."""
    latest = None

    async def reached() -> bool:
        nonlocal latest
        latest = await rig.orchestrator.get_task("acme", task_id)
        return latest.state == state

    assert await wait_until(reached, timeout_s), f"task {task_id} is {getattr(latest, 'state', None)}, not {state}"
    return latest


async def test_enqueued_task_runs_in_the_background_and_stores_its_result():
    rig = make_rig(["background answer"], max_workers=1, task_idle_wait_s=0.05)
    rig.orchestrator.start()
    try:
        session = await rig.session()
        task = await rig.orchestrator.enqueue_task(request_id="t1", tenant_id="acme", session_id=session.session_id,
                                                   user_message="do it", options={})
        again = await rig.orchestrator.enqueue_task(request_id="t1", tenant_id="acme",
                                                    session_id=session.session_id, user_message="do it", options={})
        assert again.task_id == task.task_id, "a retried enqueue does not add a second task"
        done = await wait_for_state(rig, task.task_id, "SUCCEEDED")
        assert done.result_text == "background answer" and done.attempts == 1
        events = await rig.store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
        assert events[-1].type == "final" and events[-1].body["text"] == "background answer"
    finally:
        await rig.orchestrator.close()


async def test_max_workers_caps_concurrency():
    gates = [Gate(f"answer {i}") for i in range(2)]
    third_started = asyncio.Event()
    released_when_third_started: list[bool] = []

    def third(request):
        # What the third run saw when it reached inference: had one of the first two been let go?
        released_when_third_started.append(any(gate.release.is_set() for gate in gates))
        third_started.set()
        return "answer 2"

    rig = make_rig([*gates, third], max_workers=2, task_idle_wait_s=0.05)
    rig.orchestrator.start()
    try:
        tasks = []
        for i in range(3):
            session = await rig.session()
            tasks.append(await rig.orchestrator.enqueue_task(request_id=f"t{i}", tenant_id="acme",
                                                             session_id=session.session_id, user_message="go",
                                                             options={}))
        await gates[0].reached.wait()
        await gates[1].reached.wait()
        assert not third_started.is_set() and rig.orchestrator.tasks.num_busy == 2
        gates[0].release.set()
        await asyncio.wait_for(third_started.wait(), 10)
        # The third task ran only once a worker was free, never as a third concurrent one.
        assert released_when_third_started == [True]
        assert not gates[1].release.is_set() and rig.orchestrator.tasks.num_busy == 2
        gates[1].release.set()
        for task in tasks:
            await wait_for_state(rig, task.task_id, "SUCCEEDED")
    finally:
        await rig.orchestrator.close()


class DyingStore:
    """The store as one replica sees it: after kill() nothing it sends arrives."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.dead = False

    def __getattr__(self, name):
        target = getattr(self._store, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            if self.dead:
                raise Unavailable("replica is dead")
            return target(*args, **kwargs)
        return call


async def test_killed_worker_task_is_completed_by_another_never_by_two():
    shared = MemoryStore()
    limits = RunLimits(lock_lease_ms=300)
    stuck = Gate("never")
    dying = DyingStore(shared)
    rig_a = make_rig(inference=ScriptedInference([stuck]), store=dying, max_workers=1, limits=limits,
                     task_lease_ms=300, task_idle_wait_s=0.05, replica_id="replica-a")
    rig_b = make_rig(inference=ScriptedInference(["done by b"]), store=shared, max_workers=1, limits=limits,
                     task_lease_ms=300, task_idle_wait_s=0.05, replica_id="replica-b")
    session = await rig_a.session()
    task = await rig_a.orchestrator.enqueue_task(request_id="t", tenant_id="acme", session_id=session.session_id,
                                                 user_message="work", options={})
    rig_a.orchestrator.start()
    await stuck.reached.wait()
    # Replica A dies mid-task: no heartbeat, no ack, no lock release ever reaches the store.
    dying.dead = True
    await rig_a.orchestrator.close()
    rig_b.orchestrator.start()
    try:
        done = await wait_for_state(rig_b, task.task_id, "SUCCEEDED")
    finally:
        await rig_b.orchestrator.close()
    record = await shared.get_task(tenant_id="acme", task_id=task.task_id)
    assert record.worker_id == "replica-b" and done.attempts == 2 and done.result_text == "done by b"
    events = await shared.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    finals = [e for e in events if e.type in ("final", "error")]
    assert len(finals) == 1 and finals[0].body["text"] == "done by b"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_a_queued_task_cancelled_before_any_worker_is_free_never_runs():
    rig = make_rig(["should not run"], max_workers=1, task_idle_wait_s=0.05)
    session = await rig.session()
    task = await rig.orchestrator.enqueue_task(request_id="q", tenant_id="acme", session_id=session.session_id,
                                               user_message="later", options={})
    cancelled, was_running = await rig.orchestrator.cancel_task("acme", task.task_id, "changed my mind")
    assert (cancelled.state, cancelled.error, was_running) == ("CANCELLED", "changed my mind", False)
    rig.orchestrator.start()
    try:
        await asyncio.sleep(0.3)  # several claim rounds
    finally:
        await rig.orchestrator.close()
    assert rig.inference.requests == [] and (await rig.orchestrator.get_task("acme", task.task_id)).state == "CANCELLED"
    again, _ = await rig.orchestrator.cancel_task("acme", task.task_id)
    assert again.state == "CANCELLED", "a repeated cancel answers the same"


async def test_a_running_task_is_cancelled_through_another_replica_and_only_its_run_stops():
    shared = MemoryStore()
    stuck = Gate("never")
    rig_a = make_rig(inference=ScriptedInference([stuck, "next turn"]), store=shared, max_workers=1,
                     task_idle_wait_s=0.05, replica_id="replica-a")
    rig_b = make_rig(store=shared, replica_id="replica-b")
    rig_a.orchestrator.start()
    rig_b.orchestrator.start()
    try:
        assert await rig_a.orchestrator.wait_ready()
        session = await rig_a.session()
        task = await rig_a.orchestrator.enqueue_task(request_id="r", tenant_id="acme",
                                                     session_id=session.session_id, user_message="work", options={})
        await asyncio.wait_for(stuck.reached.wait(), 10)
        cancelled, was_running = await rig_b.orchestrator.cancel_task("acme", task.task_id)
        assert was_running and cancelled.state == "CANCELLED"

        async def run_ended() -> bool:
            events = await shared.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
            return any(e.type == "final" for e in events)

        assert await wait_until(run_ended, 10), "the task's run did not stop"
        events = await shared.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
        final = [e for e in events if e.type == "final"][-1]
        assert final.body["reason"] == "cancelled" and final.run_id == f"task-{task.task_id}-1"
        assert (await rig_a.orchestrator.get_task("acme", task.task_id)).state == "CANCELLED"
        # The session is free for its next turn.
        run = await rig_a.orchestrator.runs.start(request_id="n", tenant_id="acme", session_id=session.session_id,
                                                  user_message="next")
        await asyncio.wait_for(run.done.wait(), 10)
        assert run.result.text == "next turn"
    finally:
        await rig_a.orchestrator.close()
        await rig_b.orchestrator.close()
