"""Event subscribers cost the store reads per commit, not per subscriber per second."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from services.common.runtime import running_service
from services.store.config import Settings
from services.store.metrics import EVENT_READS
from services.store.server import App

NUM_IDLE = 200


def reads() -> float:
    return EVENT_READS._value.get()  # the process-wide counter the /metrics endpoint exports


async def test_idle_watchers_do_not_read_and_another_replicas_append_arrives(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    conf = Settings(port=0, data_dir=str(tmp_path), database_url=url, watch_recheck_ms=100,
                    sqlite_synchronous="NORMAL")
    async with running_service(App(conf), conf) as a, running_service(App(conf), conf) as b, \
            grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ca, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as cb:
        replica_a, replica_b = store_pb2_grpc.StoreServiceStub(ca), store_pb2_grpc.StoreServiceStub(cb)
        ids = [f"s{i}" for i in range(NUM_IDLE + 1)]
        await asyncio.gather(*(replica_a.CreateSession(pb.CreateSessionRequest(tenant_id="t", session_id=s))
                               for s in ids))
        watches = [replica_a.WatchEvents(pb.WatchEventsRequest(tenant_id="t", session_id=s)) for s in ids]
        first = asyncio.create_task(watches[0].read())
        # Every stream open and past its first read (no headers come before an event).
        for _ in range(100):
            if a.app.core.hub.num_watchers == len(ids):
                break
            await asyncio.sleep(0.05)
        assert a.app.core.hub.num_watchers == len(ids)
        await asyncio.sleep(0.3)
        before = reads()
        await asyncio.sleep(1.0)  # ten poll intervals
        assert reads() - before < 5, "idle watchers re-read the event table"

        # Appended through replica B: A's hub never saw the commit, its poller must.
        await replica_b.AppendEvents(pb.AppendEventsRequest(tenant_id="t", session_id="s0",
                                                            events=[pb.Event(type="final", payload=b"x")]))
        reply = await asyncio.wait_for(first, 2.0)
        assert reply.event.payload == b"x" and reply.event.seq == 1
        for watch in watches:
            watch.cancel()
