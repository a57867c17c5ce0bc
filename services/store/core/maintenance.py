"""Background upkeep off the request path: lease sweeping and retention.

Retention moves old events and audit entries to the archive tables and
deletes old approvals and session controls; the audit chain heads
(``store_audit_heads``) are never touched, so a lost tail still shows.
"""
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
    approval_retention_days: float = 0.0
    session_control_retention_s: float = 0.0
    delivery_retention_days: float = 0.0

    @property
    def retains(self) -> bool:
        return any(age > 0 for age in (self.event_retention_days, self.audit_retention_days,
                                       self.approval_retention_days, self.session_control_retention_s,
                                       self.delivery_retention_days))


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
        if self.options.retains:
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
        """Archive or delete old rows in small transactions; returns how many moved or went."""
        moved = 0
        now = self.clock()
        options = self.options
        batch = options.retention_batch_rows

        async def delete_approvals(cutoff_ms: int, max_rows: int) -> int:
            # Pending approvals still waiting for an answer stay.
            return await self.repo.delete_old_approvals(cutoff_ms, now, max_rows)

        jobs: list[tuple[int, Callable[[int, int], Awaitable[int]]]] = [
            (int(options.event_retention_days * DAY_MS), self.repo.archive_events),
            (int(options.audit_retention_days * DAY_MS), self.repo.archive_audit),
            (int(options.approval_retention_days * DAY_MS), delete_approvals),
            (int(options.session_control_retention_s * 1000), self.repo.delete_old_session_controls),
            (int(options.delivery_retention_days * DAY_MS), self.repo.delete_delivered),
        ]
        for age_ms, job in jobs:
            if age_ms <= 0:
                continue
            cutoff = now - age_ms
            while not self._stop.is_set():
                num = await job(cutoff, batch)
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
