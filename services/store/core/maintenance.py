"""Background upkeep off the request path: lease sweeping and retention."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.store.core.ports import StoreRepository

log = logging.getLogger("llmesh.store.maintenance")

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class MaintenanceOptions:
    lease_sweep_interval_s: float = 0.5
    event_retention_days: float = 0.0
    audit_retention_days: float = 0.0
    retention_interval_s: float = 300.0
    retention_batch_rows: int = 1_000


class Maintenance:
    def __init__(self, repo: StoreRepository, options: MaintenanceOptions, clock: Callable[[], int]) -> None:
        self.repo = repo
        self.options = options
        self.clock = clock
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(
            self._every(self.options.lease_sweep_interval_s, self.sweep_once), name="lease-sweeper"))
        if self.options.event_retention_days > 0 or self.options.audit_retention_days > 0:
            self._tasks.append(asyncio.create_task(
                self._every(self.options.retention_interval_s, self.retain_once), name="retention"))

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def sweep_once(self) -> None:
        now = self.clock()
        num_tasks = await self.repo.release_expired_leases(now)
        num_locks = await self.repo.delete_expired_locks(now)
        if num_tasks or num_locks:
            log.info("swept expired leases", extra={"num_tasks": num_tasks, "num_locks": num_locks})

    async def retain_once(self) -> int:
        """Archive old rows in small transactions; returns how many moved."""
        moved = 0
        now = self.clock()
        batch = self.options.retention_batch_rows
        jobs: list[tuple[float, Callable[[int, int], Awaitable[int]]]] = [
            (self.options.event_retention_days, self.repo.archive_events),
            (self.options.audit_retention_days, self.repo.archive_audit),
        ]
        for days, archive in jobs:
            if days <= 0:
                continue
            cutoff = now - int(days * DAY_MS)
            while not self._stop.is_set():
                num = await archive(cutoff, batch)
                moved += num
                if num < batch:
                    break
                await asyncio.sleep(0)  # let writers in between batches
        return moved

    async def _every(self, interval_s: float, job: Callable[[], Awaitable[object]]) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), interval_s)
                return
            except TimeoutError:
                pass
            try:
                await job()
            except Exception:
                log.exception("maintenance job failed")
