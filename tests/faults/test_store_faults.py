"""The store killed mid-write, or out of disk quota: what it acknowledged stays, and it recovers."""
from __future__ import annotations

import asyncio
import resource
import signal
from pathlib import Path

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from tests.faults.processes import ServiceProcess
from tests.support.auth import service_channel

STORE = "llmesh.store.v1.StoreService"
NUM_WRITERS = 8


async def append_until_stopped(stub, session_id: str, acked: list[int], stop: asyncio.Event,
                               payload: bytes = b"e") -> grpc.StatusCode | None:
    """Append one final event at a time; record each acknowledged seq. The error that ended it, if any."""
    while not stop.is_set():
        try:
            reply = await stub.AppendEvents(pb.AppendEventsRequest(
                tenant_id="t", session_id=session_id, events=[pb.Event(type="final", payload=payload)]), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        acked.extend(reply.seqs)
    return None


async def read_all(stub, session_id: str) -> list[int]:
    seqs, after = [], 0
    while True:
        page = await stub.ReadEvents(pb.ReadEventsRequest(tenant_id="t", session_id=session_id, after_seq=after,
                                                          page_size=50))
        seqs += [e.seq for e in page.events]
        if not page.events:
            return seqs
        after = seqs[-1]


@pytest.mark.slow
async def test_killed_store_loses_no_acknowledged_event_and_serves_after_restart(tmp_path: Path) -> None:
    store = ServiceProcess("store", STORE, tmp_path)
    await store.start()
    try:
        async with service_channel(store.target, "orchestrator", store.credentials) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            sessions = [f"s{i}" for i in range(NUM_WRITERS)]
            for s in sessions:
                await stub.CreateSession(pb.CreateSessionRequest(tenant_id="t", session_id=s))
            acked: dict[str, list[int]] = {s: [] for s in sessions}
            stop = asyncio.Event()
            writers = [asyncio.create_task(append_until_stopped(stub, s, acked[s], stop)) for s in sessions]
            await asyncio.sleep(1.0)
            store.kill()  # mid-write, no drain
            ended = await asyncio.gather(*writers)
        assert all(code == grpc.StatusCode.UNAVAILABLE for code in ended), ended
        assert sum(len(a) for a in acked.values()) > 0, "nothing was written before the kill"

        await store.start()
        async with service_channel(store.target, "orchestrator", store.credentials) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            for s in sessions:
                stored = await read_all(stub, s)
                assert set(acked[s]) <= set(stored), f"{s}: acknowledged events lost"
                assert stored == list(range(1, len(stored) + 1)), f"{s}: seqs not gapless after restart"
                # And it takes new writes where the log left off.
                reply = await stub.AppendEvents(pb.AppendEventsRequest(tenant_id="t", session_id=s,
                                                                       events=[pb.Event(type="final")]))
                assert list(reply.seqs) == [len(stored) + 1]
    finally:
        store.stop()


def _small_file_quota() -> None:
    # Runs in the child: files may not grow past 4 MiB, and hitting the limit is
    # an EFBIG error the store must handle, not a SIGXFSZ that kills it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))


@pytest.mark.slow
async def test_full_disk_quota_is_resource_exhausted_keeps_acked_events_and_recovers(tmp_path: Path) -> None:
    store = ServiceProcess("store", STORE, tmp_path, preexec=_small_file_quota)
    await store.start()
    try:
        async with service_channel(store.target, "orchestrator", store.credentials) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            await stub.CreateSession(pb.CreateSessionRequest(tenant_id="t", session_id="big"))
            acked: list[int] = []
            ended = await asyncio.wait_for(
                append_until_stopped(stub, "big", acked, asyncio.Event(), payload=b"x" * 60_000), 60)
            assert ended == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{ended}\n{store.last_log()}"
            assert acked, "the quota was hit before any write"
            # Still alive and reading while the disk is full.
            assert set(acked) <= set(await read_all(stub, "big"))
        store.stop()

        store.preexec = None  # the operator frees space
        await store.start()
        async with service_channel(store.target, "orchestrator", store.credentials) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            stored = await read_all(stub, "big")
            assert set(acked) <= set(stored) and stored == list(range(1, len(stored) + 1))
            reply = await stub.AppendEvents(pb.AppendEventsRequest(tenant_id="t", session_id="big",
                                                                   events=[pb.Event(type="final")]))
            assert list(reply.seqs) == [len(stored) + 1]
    finally:
        store.stop()
