"""Task classes: interactive before batch, batch capped, bounded wait, per-tenant caps."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.tenants import TenantPolicy
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.tasks import TaskClassLimits, TaskQueue, queue_of
from tests.orchestrator.builders import make_rig
from tests.orchestrator.fakes import Gate
from tests.orchestrator.test_tasks import wait_for_state
from tests.support.waiting import wait_until

INTERACTIVE, NORMAL, BATCH = 1, 2, 3


class ClaimLog(MemoryStore):
    """The in-memory store, noting the queue of every claim a worker makes."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: list[str] = []

    async def claim_tasks(self, *, queue, **kwargs):
        self.claims.append(queue)
        return await super().claim_tasks(queue=queue, **kwargs)


async def enqueue(rig, priority: int, tenant_id: str = "acme"):
    session = await rig.session(tenant_id=tenant_id)
    task = await rig.orchestrator.enqueue_task(request_id="", tenant_id=tenant_id, session_id=session.session_id,
                                               user_message="go", options={"priority": priority})
    return session.session_id, task


async def test_an_interactive_task_is_claimed_before_batch_tasks_queued_earlier():
    rig = make_rig([f"answer {i}" for i in range(4)], max_workers=1, task_idle_wait_s=0.05)
    batch = [await enqueue(rig, BATCH) for _ in range(3)]
    interactive_session, interactive = await enqueue(rig, INTERACTIVE)
    rig.orchestrator.start()
    try:
        for _session, task in [*batch, (interactive_session, interactive)]:
            await wait_for_state(rig, task.task_id, "SUCCEEDED")
    finally:
        await rig.orchestrator.close()
    order = [r.session_id for r in rig.inference.requests]
    assert order[0] == interactive_session and order[1:] == [s for s, _ in batch]
    # The run is queued in the inference pool with its class too.
    assert rig.inference.requests[0].priority == INTERACTIVE and rig.inference.requests[1].priority == BATCH


async def test_batch_never_holds_the_reserved_worker_so_interactive_starts_at_once():
    gates = [Gate(f"batch {i}") for i in range(3)]
    store = ClaimLog()
    # Replies go to runs in the order they reach inference: two batch, the interactive one, the last batch.
    rig = make_rig([gates[0], gates[1], "interactive answer", gates[2]], store=store, max_workers=3,
                   task_idle_wait_s=0.05)
    rig.orchestrator.start()
    try:
        batch = [await enqueue(rig, BATCH) for _ in range(3)]
        await gates[0].reached.wait()
        await gates[1].reached.wait()
        # Batch now holds two workers. Wait until the idle worker has gone round the queues
        # twice since then: its first round chose its classes with batch already full.
        seen = len(store.claims)
        assert await wait_until(lambda: store.claims[seen:].count(queue_of("interactive")) >= 2)
        queue = rig.orchestrator.tasks
        assert queue_of("batch") not in store.claims[seen:], "the free worker looked at batch"
        assert queue.busy_by_class["batch"] == 2 and not gates[2].reached.is_set()
        _session, interactive = await enqueue(rig, INTERACTIVE)
        done = await wait_for_state(rig, interactive.task_id, "SUCCEEDED")
        assert done.result_text == "interactive answer"
        for gate in gates:
            gate.release.set()
        for _session, task in batch:
            await wait_for_state(rig, task.task_id, "SUCCEEDED")
    finally:
        await rig.orchestrator.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_class_left_unclaimed_past_its_max_wait_is_tried_first():
    clock = FakeClock()
    queue = TaskQueue(MemoryStore(), runs=None, max_workers=2, clock=clock,  # type: ignore[arg-type]
                      class_limits=TaskClassLimits(max_wait_s={"batch": 30.0}))
    assert queue.claim_order() == ["interactive", "normal", "batch"]
    clock.now += 31
    assert queue.claim_order() == ["batch", "interactive", "normal"]
    # Looking at batch (here: finding it empty) restarts its clock.
    assert await queue._claim() is None
    assert queue.claim_order() == ["interactive", "normal", "batch"]


def test_per_class_caps_close_a_class_and_batch_keeps_one_worker_at_least():
    queue = TaskQueue(MemoryStore(), runs=None, max_workers=1,  # type: ignore[arg-type]
                      class_limits=TaskClassLimits(max_running={"normal": 1}, batch_reserved_workers=1))
    queue.busy_by_class["normal"] = 1
    assert queue.claim_order() == ["interactive", "batch"]
    queue.busy_by_class["batch"] = 1
    assert queue.claim_order() == ["interactive"]


async def test_a_tenant_max_priority_caps_the_class_of_its_tasks():
    rig = make_rig(max_workers=0, tenant_policies={"free": TenantPolicy(max_priority="batch")})
    _session, task = await enqueue(rig, INTERACTIVE, tenant_id="free")
    stored = rig.store._tasks[task.task_id]
    assert stored.queue == queue_of("batch") == "agent-runs.batch"
    assert '"priority": 3' in stored.record.payload_json
    _session, task = await enqueue(rig, 0)
    assert rig.store._tasks[task.task_id].queue == "agent-runs", "unspecified runs as normal, in the original queue"


async def test_an_unknown_priority_is_refused_naming_the_field():
    rig = make_rig(max_workers=0)
    with pytest.raises(InvalidArgument) as info:
        await enqueue(rig, 9)
    assert info.value.field == "options.priority"


def test_negative_class_settings_are_refused_naming_the_setting():
    with pytest.raises(InvalidArgument) as info:
        TaskClassLimits(max_running={"batch": -1})
    assert info.value.field == "task_max_running_batch"
    with pytest.raises(InvalidArgument) as info:
        TaskClassLimits(batch_reserved_workers=-2)
    assert info.value.field == "task_batch_reserved_workers"
