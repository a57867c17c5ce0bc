"""An AuditLog kept in memory, with the store's append rules; for tests and
short single-process runs without a store. It keeps every entry (a chain cannot
drop its old links and still verify), so it grows with every decision."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from services.common.errors import Aborted
from services.policy.core.audit import AuditHead, AuditRecord


class MemoryAuditLog:
    def __init__(self) -> None:
        self.rows: dict[str, list[AuditRecord]] = {}

    async def head(self, tenant_id: str) -> AuditHead:
        rows = self.rows.get(tenant_id)
        return AuditHead(rows[-1].seq, rows[-1].entry_hash) if rows else AuditHead()

    async def append(self, record: AuditRecord) -> AuditRecord:
        head = await self.head(record.tenant_id)
        if record.seq != head.seq + 1 or record.prev_hash != head.entry_hash:
            raise Aborted(f"audit head of {record.tenant_id!r} moved to {head.seq}")
        stored = replace(record, create_time=datetime.now(timezone.utc))
        self.rows.setdefault(record.tenant_id, []).append(stored)
        return stored

    async def list(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        rows = [r for r in self.rows.get(tenant_id, []) if r.seq > after_seq]
        return rows[:limit]
