"""Events: gapless seqs, batched store writes, resume from anywhere without gaps or duplicates."""
from __future__ import annotations

import asyncio
import random

from services.common.errors import Unavailable
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.event_hub import EventHub
from services.orchestrator.core.events import AgentEvent
from tests.orchestrator.builders import collect, make_rig
from tests.orchestrator.fakes import ScriptedInference


async def test_batches_reach_the_store_with_the_live_seqs():
    store = MemoryStore()
    session = await store.create_session(request_id="", tenant_id="t", title="", metadata={})
    hub = EventHub(store, batch_interval_s=0.01, batch_max=16)
    stream, first = await hub.open_run(AgentEvent(session.session_id, "run1", "turn_started", {}), "t")
    published = [first] + [hub.publish(stream, AgentEvent(session.session_id, "run1", "token", {"text": str(i)}))
                           for i in range(100)]
    await hub.close_run(stream)
    stored = await store.read_events(tenant_id="t", session_id=session.session_id, after_seq=0)
    assert [e.seq for e in stored] == [e.seq for e in published] == list(range(1, 102))
    assert store.num_event_appends < 20, "token events are written in batches, not one by one"


async def test_200_random_disconnect_and_resume_points():
    rng = random.Random(7)
    answer = " ".join(f"w{i}" for i in range(120))
    inference = ScriptedInference([answer], token_delay_s=0.001)
    rig = make_rig(inference=inference)
    session = await rig.session()
    run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                             user_message="talk")

    disconnects = 0

    async def flaky_client(client_id: int) -> list[int]:
        nonlocal disconnects
        got: list[int] = []
        stream = events if client_id == 0 else await rig.orchestrator.resume("acme", session.session_id, 0)
        while True:
            quota = rng.randint(1, 12)
            finished = False
            async for event in stream:
                got.append(event.seq)
                if event.is_terminal:
                    finished = True
                    break
                quota -= 1
                if quota == 0:
                    break
            await stream.aclose()
            if finished:
                return got
            disconnects += 1
            await asyncio.sleep(rng.random() * 0.01)
            stream = await rig.orchestrator.resume("acme", session.session_id, got[-1])

    results = await asyncio.gather(*(flaky_client(i) for i in range(24)))
    await run.done.wait()
    stored = [e.seq for e in await rig.store.read_events(tenant_id="acme", session_id=session.session_id,
                                                         after_seq=0)]
    assert disconnects >= 200, disconnects
    for got in results:
        assert got == stored, "every client ends with the full ordered list, no gap, no duplicate"
    # And 200 resume points chosen at random after the run, served from the store alone.
    for after in (rng.randrange(0, len(stored)) for _ in range(200)):
        resumed = []
        async for event in await rig.orchestrator.resume("acme", session.session_id, after):
            resumed.append(event.seq)
            if event.is_terminal:
                break
        assert resumed == stored[after:]


class WatchSignallingStore(MemoryStore):
    """The in-memory store; `watching` is set once a follower waits on the store's watch."""

    def __init__(self) -> None:
        super().__init__()
        self.watching = asyncio.Event()

    async def watch_events(self, **kwargs):
        self.watching.set()
        async for event in super().watch_events(**kwargs):
            yield event


async def test_resume_of_an_idle_session_follows_the_next_run():
    store = WatchSignallingStore()
    rig = make_rig(["first", "second"], store=store)
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="one")
    first = await collect(events)
    follower = await rig.orchestrator.resume("acme", session.session_id, first[-1].seq)

    async def read_next_run():
        out = []
        async for event in follower:
            out.append(event)
            if event.is_terminal:
                return out

    assert not store.watching.is_set()
    reader = asyncio.create_task(read_next_run())
    # The follower is waiting on the idle session's stored log before the next run starts.
    await asyncio.wait_for(store.watching.wait(), 10)
    _r, events = await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                            user_message="two")
    second = await collect(events)
    followed = await asyncio.wait_for(reader, 5)
    assert [e.seq for e in followed] == [e.seq for e in second]


class BreakingWatchStore(MemoryStore):
    """The in-memory store whose watch breaks after each event it yields, as a server closing quiet streams does."""

    def __init__(self) -> None:
        super().__init__()
        self.watched_after: list[int] = []

    async def watch_events(self, **kwargs):
        self.watched_after.append(kwargs["after_seq"])
        async for event in super().watch_events(**kwargs):
            yield event
            raise Unavailable("the store closed the stream")


async def test_a_follower_of_the_store_reconnects_after_the_last_seq_it_gave():
    store = BreakingWatchStore()
    session = await store.create_session(request_id="", tenant_id="t", title="", metadata={})
    sid = session.session_id
    await store.append_events(request_id="", tenant_id="t", session_id=sid, events=[
        AgentEvent(sid, "r", "turn_started", {}), AgentEvent(sid, "r", "token", {"text": "a"})],
        idempotency_keys=["r:1", "r:2"])
    hub = EventHub(store)
    follower = hub.follow("t", sid, 0)
    got = [await asyncio.wait_for(anext(follower), 5) for _ in range(2)]
    await store.append_events(request_id="", tenant_id="t", session_id=sid,
                              events=[AgentEvent(sid, "r", "final", {})], idempotency_keys=["r:3"])
    got.append(await asyncio.wait_for(anext(follower), 5))
    await follower.aclose()
    assert [e.seq for e in got] == [1, 2, 3]
    assert store.watched_after == [0, 1, 2]
