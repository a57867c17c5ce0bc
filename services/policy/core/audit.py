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
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from services.common.errors import Aborted, Unavailable
from services.policy.core.redaction import redact_value

MAX_APPEND_ATTEMPTS = 8
# After losing a race for the chain's head (replicas share a tenant's chain), wait a random
# while, doubling per attempt, so two writers do not collide again on every retry.
CONTENDED_BACKOFF_S = 0.01
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

    async def append(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        """Store consecutive ``records`` atomically; raises Aborted unless the first extends the head exactly."""

    async def list(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        """Up to ``limit`` records with seq > after_seq, in seq order."""


def canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(key: bytes, seq: int, prev_hash: str, payload_json: str) -> str:
    message = f"{seq}|{prev_hash}|{payload_json}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class AuditChain:
    """Appends redacted, hash-chained entries and verifies chains.

    Appends of one tenant are group-committed: while one batch is being
    written, new entries queue up, and the next write carries all of them
    (up to ``max_batch``) in one call. A chain must be written in order, so
    without this every decision would wait for the round trips of all the
    decisions before it.
    """

    def __init__(self, log: AuditLog, key: bytes,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), max_batch: int = 256) -> None:
        if len(key) < 16:
            raise ValueError("the audit HMAC key must be at least 16 bytes")
        self.log = log
        self._key = key
        self._clock = clock
        self.max_batch = max_batch
        # Entries waiting for the tenant's writer: (payload_json, future of the stored record).
        self._pending: dict[str, list[tuple[str, asyncio.Future[AuditRecord]]]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        # Heads this process wrote: a chain that ends before one was truncated.
        self._known_heads: dict[str, AuditHead] = {}

    async def append(self, tenant_id: str, payload: dict[str, Any], *, redacted: bool = False) -> AuditRecord:
        """Chain ``payload``; ``redacted`` says its secrets were already removed (off the event loop)."""
        body = dict(payload) if redacted else redact_value(dict(payload))
        body["time"] = self._clock().isoformat()
        future: asyncio.Future[AuditRecord] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(tenant_id, []).append((canonical_json(body), future))
        if tenant_id not in self._writers:
            self._writers[tenant_id] = asyncio.create_task(self._write_pending(tenant_id),
                                                           name=f"audit-writer-{tenant_id}")
        # The entry is written even if this caller goes away: the decision was made.
        return await asyncio.shield(future)

    async def _write_pending(self, tenant_id: str) -> None:
        try:
            while self._pending.get(tenant_id):
                queue = self._pending[tenant_id]
                batch, self._pending[tenant_id] = queue[:self.max_batch], queue[self.max_batch:]
                try:
                    stored = await self._write(tenant_id, [payload_json for payload_json, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), record in zip(batch, stored, strict=True):
                    if not future.done():
                        future.set_result(record)
        finally:
            del self._writers[tenant_id]
            if not self._pending.get(tenant_id):
                self._pending.pop(tenant_id, None)

    async def _write(self, tenant_id: str, payloads: list[str]) -> list[AuditRecord]:
        head = self._known_heads.get(tenant_id)
        for attempt in range(MAX_APPEND_ATTEMPTS):
            if head is None:
                head = await self.log.head(tenant_id)
            records, seq, prev = [], head.seq, head.entry_hash
            for payload_json in payloads:
                seq += 1
                record = AuditRecord(tenant_id, seq, prev, entry_hash(self._key, seq, prev, payload_json),
                                     payload_json)
                records.append(record)
                prev = record.entry_hash
            try:
                stored = await self.log.append(records)
            except Aborted:
                # Another writer extended the chain first: re-read the head.
                head = None
                await asyncio.sleep(random.uniform(0.0, CONTENDED_BACKOFF_S * 2 ** attempt))
                continue
            self._known_heads[tenant_id] = AuditHead(stored[-1].seq, stored[-1].entry_hash)
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
