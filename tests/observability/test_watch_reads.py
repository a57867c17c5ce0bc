"""Event subscribers cost the store reads per commit, not per subscriber per second."""
from __future__ import annotations

import asyncio
from pathlib import Path

from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from services.common.runtime import running_service
from services.store.config import Settings
from services.store.metrics import EVENT_READS
from services.store.server import App
from tests.support.auth import service_channel
from tests.support.waiting import wait_until

NUM_IDLE = 200


def reads() -> float:
    return EVENT_READS._value.get()  # the process-wide counter the /metrics endpoint exports


async def test_idle_watchers_do_not_read_and_another_replicas_append_arrives(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    conf = Settings(port=0, data_dir=str(tmp_path), database_url=url, watch_recheck_ms=100,
                    sqlite_synchronous="NORMAL")
    async with running_service(App(conf), conf) as a, running_service(App(conf), conf) as b, \
            service_channel(a.address, "orchestrator") as ca, \
            service_channel(b.address, "orchestrator") as cb:
        replica_a, replica_b = store_pb2_grpc.StoreServiceStub(ca), store_pb2_grpc.StoreServiceStub(cb)
        ids = [f"s{i}" for i in range(NUM_IDLE + 1)]
        await asyncio.gather(*(replica_a.CreateSession(pb.CreateSessionRequest(tenant_id="t", session_id=s))
                               for s in ids))
        watches = [replica_a.WatchEvents(pb.WatchEventsRequest(tenant_id="t", session_id=s)) for s in ids]
        first = asyncio.create_task(watches[0].read())
        # Every stream open (no headers come before an event). A watcher subscribes and counts its
        # catch-up read in one step, so every first read is counted once all are subscribed.
        assert await wait_until(lambda: a.app.core.hub.num_watchers == len(ids), timeout_s=30)
        before = reads()
        polls = a.app.poller.num_polls
        assert await wait_until(lambda: a.app.poller.num_polls >= polls + 10, timeout_s=30)  # ten polls
        assert reads() - before < 5, "idle watchers re-read the event table"

        # Appended through replica B: A's hub never saw the commit, its poller must.
        await replica_b.AppendEvents(pb.AppendEventsRequest(tenant_id="t", session_id="s0",
                                                            events=[pb.Event(type="final", payload=b"x")]))
        reply = await asyncio.wait_for(first, 10)  # a hang guard; the next poll (100 ms) finds it
        assert reply.event.payload == b"x" and reply.event.seq == 1
        for watch in watches:
            watch.cancel()
