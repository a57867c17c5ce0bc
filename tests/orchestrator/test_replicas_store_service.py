"""Two orchestrator replicas on the real store service (SQLite, in process, over gRPC).

The same cases as test_replicas.py where they need the store's own parts:
session controls through WatchSessionControls, fenced appends, and lock
leases that run out on the store's clock (short leases; every wait is on a
condition with a bound, never on a fixed sleep).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.runtime import running_service
from services.orchestrator.adapters.grpc_store import GrpcStore
from services.orchestrator.core.ports import APPROVE_ONCE
from services.orchestrator.core.recovery import REPLICA_LOST
from services.orchestrator.core.runs import RunLimits
from services.store.config import Settings
from services.store.server import build_app
from tests.orchestrator.builders import collect
from tests.orchestrator.fakes import Gate, call
from tests.orchestrator.replicas import Severable, two_replicas, until_terminal
from tests.support.auth import service_channel
from tests.support.waiting import wait_until

TENANT = "acme"
DEADLINE_S = 20.0


@contextlib.asynccontextmanager
async def store_service(tmp_path: Path) -> AsyncIterator[tuple[GrpcStore, GrpcStore]]:
    """The store service, and one client of it per replica (each on its own channel)."""
    settings = Settings(port=0, data_dir=str(tmp_path), database_url=f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
                        lease_sweep_interval_ms=50)
    async with running_service(build_app(settings), settings) as service, \
            service_channel(f"127.0.0.1:{service.port}", "orchestrator") as channel_a, \
            service_channel(f"127.0.0.1:{service.port}", "orchestrator") as channel_b:
        yield GrpcStore.for_channel(channel_a), GrpcStore.for_channel(channel_b)


async def turn_started_stored(store: GrpcStore, session_id: str) -> bool:
    return bool(await store.read_events(tenant_id=TENANT, session_id=session_id, after_seq=0))


async def test_cancel_and_approval_through_the_other_replica_over_the_store_service(tmp_path: Path):
    command = call("shell", command="make clean")
    gate = Gate("never sent")
    async with store_service(tmp_path) as (store_a, store_b), \
            two_replicas([command, "cleaned", gate], store=store_b, a_store=store_a) as pair:
        sid = (await pair.a.session()).session_id
        _run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                     user_message="clean")
        seen = []
        async for event in events:
            seen.append(event)
            if event.type == "approval_required":
                assert await pair.b.orchestrator.submit_approval(
                    request_id="x1", tenant_id=TENANT, session_id=sid, approval_id=event.body["approval_id"],
                    decision=APPROVE_ONCE, approver="ops")
        assert seen[-1].body["text"] == "cleaned" and [c.name for c in pair.tools.executed] == ["shell"]

        run, events = await pair.a.orchestrator.run(request_id="r2", tenant_id=TENANT, session_id=sid,
                                                    user_message="wait")
        await gate.reached.wait()
        assert await pair.b.orchestrator.cancel(TENANT, sid, request_id="c1")
        live = await asyncio.wait_for(collect(events), DEADLINE_S)
        assert live[-1].body["reason"] == "cancelled"
        await run.done.wait()
        stored = await store_b.read_events(tenant_id=TENANT, session_id=sid, after_seq=0)
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1)) and stored[-1].seq == live[-1].seq


async def test_a_dead_replicas_turn_is_ended_by_a_resume_over_the_store_service(tmp_path: Path):
    gate = Gate("never sent")
    lease = RunLimits(lock_lease_ms=600)
    async with store_service(tmp_path) as (store_a, store_b), \
            two_replicas([gate], ["goes on"], store=store_b, a_store=Severable(store_a),
                         a_limits=lease, b_limits=lease) as pair:
        sid = (await pair.a.session()).session_id
        run, _events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                     user_message="go")
        await gate.reached.wait()
        assert await wait_until(lambda: turn_started_stored(store_b, sid), DEADLINE_S)
        follower = await pair.b.orchestrator.resume(TENANT, sid, 0)
        # Replica a stops reaching the store; its lock is never released, and runs out on the store's clock.
        severed = pair.a.store
        assert isinstance(severed, Severable)
        severed.severed = True
        await pair.a.orchestrator.controls.close()
        run.task.cancel()
        await asyncio.wait_for(run.done.wait(), DEADLINE_S)
        resumed = await asyncio.wait_for(until_terminal(follower), DEADLINE_S)
        assert resumed[-1].type == "error" and resumed[-1].body["reason"] == REPLICA_LOST
        assert resumed[-1].run_id == run.spec.run_id
        _r, events = await pair.b.orchestrator.run(request_id="r2", tenant_id=TENANT, session_id=sid,
                                                   user_message="again")
        assert (await collect(events))[-1].body["text"] == "goes on"
        stored = await store_b.read_events(tenant_id=TENANT, session_id=sid, after_seq=0)
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
        assert [e.type for e in stored].count("error") == 1


async def test_a_stale_replicas_append_is_refused_by_the_store_service(tmp_path: Path):
    gate = Gate(call("fs_read", path="notes.txt"))

    async def stuck_read(_args: dict) -> str:
        await asyncio.Event().wait()
        return "never"

    async with store_service(tmp_path) as (store_a, store_b), \
            two_replicas([gate], ["b answers"], store=store_b, a_store=store_a,
                         a_limits=RunLimits(lock_lease_ms=600_000)) as pair:
        pair.tools.handlers["fs_read"] = stuck_read
        sid = (await pair.a.session()).session_id
        run, events = await pair.a.orchestrator.run(request_id="r1", tenant_id=TENANT, session_id=sid,
                                                    user_message="read")
        await gate.reached.wait()
        assert await wait_until(lambda: turn_started_stored(store_b, sid), DEADLINE_S)
        # Another owner takes the session from under replica a (as after a lapse a did not notice).
        await store_b.release_session_lock(tenant_id=TENANT, session_id=sid, owner_id=run.lease.owner_id)
        assert (await store_b.acquire_session_lock(tenant_id=TENANT, session_id=sid, owner_id="intruder",
                                                   lease_ms=60_000)).acquired
        gate.release.set()
        with pytest.raises(Exception) as lost:
            await asyncio.wait_for(until_terminal(events), DEADLINE_S)
        assert getattr(lost.value, "reason", "") == "RUN_OWNERSHIP_LOST"
        await asyncio.wait_for(run.done.wait(), DEADLINE_S)
        assert run.lease.fenced and pair.a.orchestrator.runs.num_fenced_runs == 1
        stored = await store_b.read_events(tenant_id=TENANT, session_id=sid, after_seq=0)
        assert [e.type for e in stored] == ["turn_started"], "nothing of a's after the lock changed hands"
