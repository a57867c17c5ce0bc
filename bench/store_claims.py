"""Claim race for the store benchmark: 8 worker processes drain one PostgreSQL queue.

Every execution is logged (task, lease token, start, lease expiry) so the
parent can count tasks that ran twice while a lease was still valid, and
tasks that never finished after one worker is killed mid-run.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import time
import uuid
from pathlib import Path

from sqlalchemy import func, insert, select

from services.store.adapters.database import Database, DatabaseOptions
from services.store.adapters.repository import SqlRepository
from services.store.adapters.tables import TaskRow
from services.store.core.models import TaskState

LEASE_MS = 1_500


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _open(url: str) -> tuple[Database, SqlRepository]:
    db = Database(url, DatabaseOptions(pool_size=2, pool_max_overflow=0))
    return db, SqlRepository(db)


async def _seed(url: str, num_tasks: int) -> None:
    db, _ = await _open(url)
    await db.migrate()
    t = now_ms()
    rows = [dict(task_id=uuid.uuid4().hex, tenant_id="bench", queue="bench", priority=i % 3, payload_json="{}",
                 state=int(TaskState.READY), attempts=0, max_attempts=10, worker_id="", lease_token="",
                 claim_id=None, lease_expire_ms=0, run_after_ms=t, result_json="", last_error="",
                 idempotency_key=None, create_ms=t, update_ms=t) for i in range(num_tasks)]
    def insert_all(s) -> None:
        for start in range(0, num_tasks, 1000):
            s.execute(insert(TaskRow), rows[start:start + 1000])

    await db.write(insert_all)
    await db.close()


async def _remaining(db: Database) -> int:
    async with db.reader() as s:
        query = select(func.count()).select_from(TaskRow).where(
            TaskRow.state.in_([int(TaskState.READY), int(TaskState.LEASED)]))
        return int((await s.execute(query)).scalar_one())


async def _work(url: str, worker: str, log_path: str) -> None:
    db, repo = await _open(url)
    # Line-buffered: a worker killed mid-run has logged every claim it made.
    log = await asyncio.to_thread(open, log_path, "a", buffering=1)
    with log:
        while True:
            tasks = await repo.claim_tasks("bench", worker, 10, LEASE_MS, "", now_ms())
            if not tasks:
                if await _remaining(db) == 0:
                    break
                await asyncio.sleep(0.05)
                continue
            for task in tasks:
                log.write(json.dumps({"task": task.task_id, "token": task.lease_token, "start": now_ms(),
                                      "expire": task.lease_expire_ms}) + "\n")
                await asyncio.sleep(0.0005)  # the "work"
                try:
                    await repo.ack_task(task.task_id, task.lease_token, "{}", now_ms())
                except Exception:
                    pass
    await db.close()


def _worker_main(url: str, worker: str, log_path: str) -> None:
    asyncio.run(_work(url, worker, log_path))


async def _sweep_until(url: str, done: asyncio.Event) -> None:
    db, repo = await _open(url)
    while not done.is_set():
        await repo.release_expired_leases(now_ms())
        try:
            await asyncio.wait_for(done.wait(), 0.2)
        except TimeoutError:
            pass
    await db.close()


def run_claim_race(url: str, workdir: Path, num_tasks: int = 10_000, num_workers: int = 8) -> dict:
    asyncio.run(_seed(url, num_tasks))
    ctx = multiprocessing.get_context("spawn")
    logs = [workdir / f"worker{i}.jsonl" for i in range(num_workers)]
    procs = [ctx.Process(target=_worker_main, args=(url, f"w{i}", str(logs[i]))) for i in range(num_workers)]
    started = time.perf_counter()

    async def supervise() -> None:
        done = asyncio.Event()
        sweeper = asyncio.create_task(_sweep_until(url, done))
        for p in procs:
            p.start()
        await asyncio.sleep(1.0)
        os.kill(procs[0].pid, signal.SIGKILL)  # one worker dies holding leases
        deadline = time.monotonic() + 240
        for p in procs:
            await asyncio.to_thread(p.join, max(0.0, deadline - time.monotonic()))
        done.set()
        await sweeper

    asyncio.run(supervise())
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    elapsed = time.perf_counter() - started
    runs: dict[str, list[dict]] = {}
    for path in logs:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    runs.setdefault(entry["task"], []).append(entry)
    duplicates = 0
    for entries in runs.values():
        entries.sort(key=lambda e: e["start"])
        for earlier, later in zip(entries, entries[1:], strict=False):
            if later["start"] < earlier["expire"]:
                duplicates += 1
    reruns = sum(len(v) - 1 for v in runs.values())

    async def count_lost() -> int:
        db, _ = await _open(url)
        async with db.reader() as s:
            query = select(func.count()).select_from(TaskRow).where(TaskRow.state != int(TaskState.DONE))
            lost = int((await s.execute(query)).scalar_one())
        await db.close()
        return lost

    return {"claim_duplicates_postgres": duplicates, "claim_lost_postgres": asyncio.run(count_lost()),
            "claim_reruns_after_expiry_postgres": reruns - duplicates,
            "claim_seconds_postgres": round(elapsed, 2), "claim_tasks": num_tasks, "claim_workers": num_workers}
