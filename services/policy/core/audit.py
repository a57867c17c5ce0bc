"""The tamper-evident audit chain.

entry_hash = HMAC-SHA256(key, f"{seq}|{prev_hash}|{payload_json}") in hex,
where payload_json is canonical JSON (sorted keys, no spaces) with secrets
already redacted. The key never reaches the database, so whoever can edit
rows cannot forge hashes; ``verify`` recomputes the chain and names the
first entry that does not fit.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from services.common.errors import Aborted, Unavailable
from services.policy.core.redaction import redact_value

MAX_APPEND_ATTEMPTS = 8
VERIFY_PAGE_SIZE = 500


@dataclass(frozen=True)
class AuditRecord:
    tenant_id: str
    seq: int
    prev_hash: str
    entry_hash: str
    payload_json: str
    create_time: datetime | None = None


@dataclass(frozen=True)
class AuditHead:
    seq: int = 0
    entry_hash: str = ""


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    num_checked: int
    first_broken_seq: int = 0
    reason: str = ""


class AuditLog(Protocol):
    """Where the chain is stored (the store service, or memory in tests)."""

    async def head(self, tenant_id: str) -> AuditHead:
        """Last seq and hash of the tenant's chain; seq 0 when empty."""

    async def append(self, record: AuditRecord) -> AuditRecord:
        """Store ``record``; raises Aborted unless it extends the head exactly."""

    async def list(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        """Up to ``limit`` records with seq > after_seq, in seq order."""


def canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(key: bytes, seq: int, prev_hash: str, payload_json: str) -> str:
    message = f"{seq}|{prev_hash}|{payload_json}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class AuditChain:
    """Appends redacted, hash-chained entries and verifies chains."""

    def __init__(self, log: AuditLog, key: bytes,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        if len(key) < 16:
            raise ValueError("the audit HMAC key must be at least 16 bytes")
        self.log = log
        self._key = key
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        # Heads this process wrote: a chain that ends before one was truncated.
        self._known_heads: dict[str, AuditHead] = {}

    async def append(self, tenant_id: str, payload: dict[str, Any]) -> AuditRecord:
        body = redact_value(dict(payload))
        body["time"] = self._clock().isoformat()
        payload_json = canonical_json(body)
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            head = self._known_heads.get(tenant_id)
            for _attempt in range(MAX_APPEND_ATTEMPTS):
                if head is None:
                    head = await self.log.head(tenant_id)
                seq = head.seq + 1
                record = AuditRecord(tenant_id, seq, head.entry_hash,
                                     entry_hash(self._key, seq, head.entry_hash, payload_json), payload_json)
                try:
                    stored = await self.log.append(record)
                except Aborted:
                    # Another writer extended the chain first: re-read the head.
                    head = None
                    continue
                self._known_heads[tenant_id] = AuditHead(stored.seq, stored.entry_hash)
                return stored
        raise Unavailable(f"audit chain of tenant {tenant_id!r} kept moving; gave up after "
                          f"{MAX_APPEND_ATTEMPTS} attempts", reason="AUDIT_CONTENDED")

    async def verify(self, tenant_id: str) -> VerifyReport:
        expected_seq, prev_hash, checked = 1, "", 0
        while True:
            page = await self.log.list(tenant_id, expected_seq - 1, VERIFY_PAGE_SIZE)
            for record in page:
                if record.seq != expected_seq:
                    return VerifyReport(False, checked, expected_seq,
                                        f"entry {expected_seq} is missing (next stored entry is {record.seq})")
                if record.prev_hash != prev_hash:
                    return VerifyReport(False, checked, record.seq,
                                        f"entry {record.seq} does not link to the hash of entry {record.seq - 1}")
                if not hmac.compare_digest(record.entry_hash,
                                           entry_hash(self._key, record.seq, record.prev_hash, record.payload_json)):
                    return VerifyReport(False, checked, record.seq,
                                        f"entry {record.seq} was altered: its hash does not match its contents")
                checked += 1
                expected_seq += 1
                prev_hash = record.entry_hash
            if len(page) < VERIFY_PAGE_SIZE:
                break
        stored_head = await self.log.head(tenant_id)
        known = self._known_heads.get(tenant_id, AuditHead())
        last = expected_seq - 1
        for head, where in ((stored_head, "the store's head"), (known, "the last entry this service wrote")):
            if head.seq > last:
                return VerifyReport(False, checked, last + 1,
                                    f"entries {last + 1}..{head.seq} are missing ({where} is {head.seq})")
            if head.seq == last and head.seq and head.entry_hash != prev_hash:
                return VerifyReport(False, checked, last, f"entry {last} differs from {where}")
        return VerifyReport(True, checked)

    async def list(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        return await self.log.list(tenant_id, after_seq, limit)
