"""Store writes off the turn's critical path, with the stored log still equal to the live one."""
from __future__ import annotations

import asyncio

from services.orchestrator.adapters.grpc_store import GrpcStore
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.event_hub import EventHub
from services.orchestrator.core.events import AgentEvent
from tests.orchestrator.builders import collect, make_rig
from tests.support.waiting import wait_until


class RecordingStore(MemoryStore):
    """The in-memory store, logging each write and read a turn makes; message writes can be held."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[str]]] = []
        self.messages_gate = asyncio.Event()
        self.messages_gate.set()

    async def append_messages(self, **kw):
        await self.messages_gate.wait()
        self.calls.append(("append_messages", [m.role for m in kw["messages"]]))
        return await super().append_messages(**kw)

    async def append_events(self, **kw):
        self.calls.append(("append_events", [e.type for e in kw["events"]]))
        return await super().append_events(**kw)

    async def list_messages(self, **kw):
        self.calls.append(("list_messages", []))
        return await super().list_messages(**kw)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


async def test_first_event_is_numbered_from_the_lock_grant_and_stored_with_the_first_batch():
    store = MemoryStore()
    session = await store.create_session(request_id="", tenant_id="t", title="", metadata={})
    await store.append_events(request_id="", tenant_id="t", session_id=session.session_id,
                              events=[AgentEvent(session.session_id, "old", "final", {})], idempotency_keys=["k"])
    grant = await store.acquire_session_lock(tenant_id="t", session_id=session.session_id, owner_id="run1",
                                             lease_ms=1000)
    hub = EventHub(store, batch_interval_s=0.01, batch_max=16)
    appends_before = store.num_event_appends
    stream, first = await hub.open_run(AgentEvent(session.session_id, "run1", "turn_started", {}), "t",
                                       next_seq=grant.next_event_seq)
    assert first.seq == 2 and store.num_event_appends == appends_before, "no round trip to open a run"
    tokens = [hub.publish(stream, AgentEvent(session.session_id, "run1", "token", {"text": str(i)}))
              for i in range(5)]
    await hub.close_run(stream)
    stored = await store.read_events(tenant_id="t", session_id=session.session_id, after_seq=1)
    assert [(e.seq, e.type) for e in stored] == [(e.seq, e.type) for e in [first, *tokens]]
    assert store.num_event_appends == appends_before + 1, "the first event rode with the token batch"


async def test_terminal_event_is_live_at_once_but_stored_only_after_the_held_work():
    store = MemoryStore()
    session = await store.create_session(request_id="", tenant_id="t", title="", metadata={})
    hub = EventHub(store, batch_interval_s=0.001, batch_max=16)
    stream, first = await hub.open_run(AgentEvent(session.session_id, "r", "turn_started", {}), "t", next_seq=1)
    messages_stored: asyncio.Future = asyncio.get_running_loop().create_future()
    hub.hold_terminal(stream, messages_stored)
    live = hub.follow("t", session.session_id, 0, until_run_ends="r")
    final = hub.publish(stream, AgentEvent(session.session_id, "r", "final", {"text": "done"}))
    assert [e.seq async for e in live] == [first.seq, final.seq]
    closing = asyncio.create_task(hub.close_run(stream))
    # The flusher takes the held work (clearing before_terminal) once all before the final is written.
    assert await wait_until(lambda: stream.before_terminal is None)
    stored = await store.read_events(tenant_id="t", session_id=session.session_id, after_seq=0)
    assert [e.type for e in stored] == ["turn_started"], "the final waits for the messages"
    assert not closing.done()
    messages_stored.set_result(None)
    await closing
    stored = await store.read_events(tenant_id="t", session_id=session.session_id, after_seq=0)
    assert [e.type for e in stored] == ["turn_started", "final"]


async def test_a_turn_writes_its_messages_before_its_stored_final_without_waiting_for_them():
    store = RecordingStore()
    rig = make_rig(["hello there", "second answer"], store=store)
    session = await rig.session()
    store.messages_gate.clear()  # the store is slow to take messages
    run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                             user_message="hi")
    got = await asyncio.wait_for(collect(events), 2)
    assert got[-1].type == "final", "the final event reached the client while messages were still pending"
    assert "append_messages" not in store.names()
    store.messages_gate.set()
    await run.done.wait()
    finals = [i for i, (name, types) in enumerate(store.calls) if name == "append_events" and "final" in types]
    messages = [i for i, name in enumerate(store.names()) if name == "append_messages"]
    assert finals and messages and max(messages) < finals[0]
    stored = await store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    assert [(e.seq, e.type) for e in stored] == [(e.seq, e.type) for e in got]


async def test_next_turn_skips_the_history_check_unless_another_writer_came_between():
    store = RecordingStore()
    rig = make_rig(["one", "two", "three"], store=store)
    session = await rig.session()
    for turn, message in enumerate(["a", "b"]):
        run, events = await rig.orchestrator.run(request_id=f"t{turn}", tenant_id="acme",
                                                 session_id=session.session_id, user_message=message)
        await collect(events)
        await run.done.wait()
    # First turn builds the context from the store; the second trusts its cache.
    assert store.names().count("list_messages") == 1
    first_appends = [types for name, types in store.calls if name == "append_events"]
    assert all(types[0] != "turn_started" or len(types) > 1 for types in first_appends), \
        "turn_started is batched with later events, never appended on its own"
    # Another replica's turn (seen here as a foreign event) makes the next turn look at the store.
    await store.append_events(request_id="x", tenant_id="acme", session_id=session.session_id,
                              events=[AgentEvent(session.session_id, "other", "final", {})],
                              idempotency_keys=["other:1"])
    run, events = await rig.orchestrator.run(request_id="t3", tenant_id="acme", session_id=session.session_id,
                                             user_message="c")
    got = await collect(events)
    await run.done.wait()
    assert store.names().count("list_messages") == 2
    stored = await store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1)) and stored[-1].seq == got[-1].seq


class CapturingStub:
    def __init__(self) -> None:
        self.requests = []

    async def AppendEvents(self, request):
        from llmesh.store.v1 import store_pb2
        self.requests.append(request)
        return store_pb2.AppendEventsResponse(seqs=[7 + i for i in range(len(request.events))])


async def test_grpc_adapter_asks_the_store_never_to_drop_its_numbered_events():
    stub = CapturingStub()
    store = GrpcStore(stub)
    seqs = await store.append_events(request_id="r:7", tenant_id="t", session_id="s",
                                     events=[AgentEvent("s", "r", "token", {"text": "x"})] * 2,
                                     idempotency_keys=["r:7", "r:8"])
    assert seqs == [7, 8] and stub.requests[0].no_drop


class WaitedOnEvent(asyncio.Event):
    """An event that notes when someone starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = asyncio.Event()

    async def wait(self):
        self.waited.set()
        return await super().wait()


class SlowEventStore(MemoryStore):
    """Event appends wait on a gate, as a store under load would."""

    def __init__(self) -> None:
        super().__init__()
        self.events_gate = asyncio.Event()
        self.num_lock_acquires = 0

    async def append_events(self, **kw):
        await self.events_gate.wait()
        return await super().append_events(**kw)

    async def acquire_session_lock(self, **kw):
        self.num_lock_acquires += 1
        return await super().acquire_session_lock(**kw)


async def test_back_to_back_turns_take_over_the_lock_while_the_store_catches_up():
    store = SlowEventStore()
    rig = make_rig(["one", "two", "three", "four"], store=store)
    session = await rig.session()
    live = []
    runs = []
    for turn in range(3):  # the store takes nothing yet: all run on the first turn's lock
        run, events = await rig.orchestrator.run(request_id=f"t{turn}", tenant_id="acme",
                                                 session_id=session.session_id, user_message=f"m{turn}")
        runs.append(run)
        live += await asyncio.wait_for(collect(events), 2)
    assert store.num_lock_acquires == 1
    # A client resuming from the start now sees every run once, in order, though none is stored.
    resumed = await rig.orchestrator.resume("acme", session.session_id, 0)
    seen = []
    async for event in resumed:
        seen.append(event)
        if event.seq == live[-1].seq:
            break
    await resumed.aclose()
    assert [e.seq for e in seen] == [e.seq for e in live] == list(range(1, len(live) + 1))
    # The next turn waits for the store: at most two earlier runs may be unstored.
    last = runs[-1]
    assert not last.done.is_set()
    last.done = WaitedOnEvent()  # nothing waits on it yet; the run sets it when it ends
    third = asyncio.create_task(rig.orchestrator.run(request_id="t3", tenant_id="acme",
                                                     session_id=session.session_id, user_message="m3"))
    await asyncio.wait_for(last.done.waited.wait(), 10)  # the new turn waits for the last run to end
    assert not third.done() and store.num_lock_acquires == 1
    store.events_gate.set()
    run, events = await asyncio.wait_for(third, 2)
    assert store.num_lock_acquires == 2, "the new turn took the lock anew instead of taking over"
    live += await collect(events)
    await run.done.wait()
    for earlier in runs:
        await earlier.done.wait()
    stored = await store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    assert [(e.seq, e.type, e.run_id) for e in stored] == [(e.seq, e.type, e.run_id) for e in live]
    # The last run let the lock go: another replica can take the session now.
    other = await store.acquire_session_lock(tenant_id="acme", session_id=session.session_id, owner_id="other",
                                             lease_ms=1000)
    assert other.acquired and other.next_event_seq == live[-1].seq + 1
