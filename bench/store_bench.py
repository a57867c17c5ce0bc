"""Store benchmark: `make bench-store` -> bench/results/store.json (SQLite and PostgreSQL).

- events_per_s_<backend>: one-event AppendEvents calls through the gRPC API,
  32 concurrent writers, store in this process.
- batched_vs_unbatched_ratio: the batched event writer against one
  transaction per event (same 32 writers, SQLite, below the gRPC layer so the
  number measures the writer, not the RPC stack).
- claim_duplicates_postgres / claim_lost_postgres: see bench/store_claims.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from bench.store_claims import run_claim_race
from services.common.clients import make_channel
from services.common.runtime import running_service
from services.store.adapters.database import Database
from services.store.adapters.repository import SqlRepository
from services.store.config import Settings
from services.store.core.event_writer import EventWriter
from services.store.core.models import NewEvent, NewSession
from services.store.core.store import wall_clock_ms
from services.store.server import App
from tests.support.auth import service_identity
from tests.support.postgres import postgres_cluster

NUM_WRITERS = 32


async def grpc_events_per_s(url: str, data_dir: Path, seconds: float) -> float:
    settings = Settings(port=0, data_dir=str(data_dir), database_url=url)
    async with running_service(App(settings), settings) as svc:
        # The writers stand in for the orchestrator, the store's caller in the mesh.
        async with make_channel(svc.address, service_identity("orchestrator")) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            for w in range(NUM_WRITERS):
                await stub.CreateSession(pb.CreateSessionRequest(tenant_id="bench", session_id=f"s{w}"))
            count = 0
            stop = time.perf_counter() + seconds

            async def writer(w: int) -> None:
                nonlocal count
                while time.perf_counter() < stop:
                    await stub.AppendEvents(pb.AppendEventsRequest(
                        tenant_id="bench", session_id=f"s{w}",
                        events=[pb.Event(type="tool_result", payload=b"x" * 200)]))
                    count += 1

            started = time.perf_counter()
            await asyncio.gather(*[writer(w) for w in range(NUM_WRITERS)])
            return count / (time.perf_counter() - started)


async def writer_events_per_s(url: str, batched: bool, seconds: float) -> float:
    db = Database(url)
    await db.migrate()
    repo = SqlRepository(db)
    writer = EventWriter(lambda appends: repo.append_events(appends, wall_clock_ms()),
                         max_batch_events=256 if batched else 1, max_batch_delay_ms=2.0 if batched else 0.0)
    writer.start()
    for w in range(NUM_WRITERS):
        await repo.create_session(NewSession("bench", f"s{w}", "", "", ""), wall_clock_ms())
    count = 0
    stop = time.perf_counter() + seconds

    async def one(w: int) -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await writer.append("bench", f"s{w}", [NewEvent("tool_result", b"x" * 200, "", 1)])
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*[one(w) for w in range(NUM_WRITERS)])
    rate = count / (time.perf_counter() - started)
    await writer.close()
    await db.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/store.json")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()
    result: dict[str, object] = {"writers": NUM_WRITERS, "seconds_per_run": args.seconds,
                                 "python": platform.python_version(), "machine": platform.machine()}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        tmpdir = Path(tmp)
        sqlite_url = f"sqlite+aiosqlite:///{tmpdir / 'grpc.db'}"
        result["events_per_s_sqlite"] = round(asyncio.run(grpc_events_per_s(sqlite_url, tmpdir, args.seconds)), 1)
        batched = asyncio.run(writer_events_per_s(f"sqlite+aiosqlite:///{tmpdir / 'b.db'}", True, args.seconds))
        unbatched = asyncio.run(writer_events_per_s(f"sqlite+aiosqlite:///{tmpdir / 'u.db'}", False, args.seconds))
        result["writer_batched_events_per_s_sqlite"] = round(batched, 1)
        result["writer_unbatched_events_per_s_sqlite"] = round(unbatched, 1)
        result["batched_vs_unbatched_ratio"] = round(batched / unbatched, 2)
        with postgres_cluster() as cluster:
            result["events_per_s_postgres"] = round(
                asyncio.run(grpc_events_per_s(cluster.new_database("grpc"), tmpdir, args.seconds)), 1)
            result.update(run_claim_race(cluster.new_database("claims"), tmpdir, num_tasks=args.tasks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
