"""An AuditLog kept in memory, with the store's append rules; for tests and
short single-process runs without a store. It keeps every entry (a chain cannot
drop its old links and still verify), so it grows with every decision."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from services.common.errors import Aborted
from services.policy.core.audit import AuditHead, AuditRecord


class MemoryAuditLog:
    def __init__(self) -> None:
        self.rows: dict[str, list[AuditRecord]] = {}

    async def head(self, tenant_id: str) -> AuditHead:
        rows = self.rows.get(tenant_id)
        return AuditHead(rows[-1].seq, rows[-1].entry_hash) if rows else AuditHead()

    async def append(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        first = records[0]
        head = await self.head(first.tenant_id)
        if first.seq != head.seq + 1 or first.prev_hash != head.entry_hash:
            raise Aborted(f"audit head of {first.tenant_id!r} moved to {head.seq}")
        now = datetime.now(UTC)
        stored = [replace(record, create_time=now) for record in records]
        self.rows.setdefault(first.tenant_id, []).extend(stored)
        return stored

    async def list(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        rows = [r for r in self.rows.get(tenant_id, []) if r.seq > after_seq]
        return rows[:limit]
