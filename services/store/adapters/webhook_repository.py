"""Webhook subscriptions and the delivery outbox in SQL.

``outbox_rows`` runs inside the transactions that store the triggering events
(AppendEvents, AckTask, FailTask), so a delivery exists exactly when its event
does. Claims take the oldest due delivery of each (webhook, session) queue:
a delivery waits while an earlier one of its session to the same webhook is
pending, which keeps per-session order per destination.
"""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from services.common.errors import FailedPrecondition, NotFound
from services.store.adapters.database import Database, WritePriority, delete_batch
from services.store.adapters.tables import DeliveryRow, WebhookRow
from services.store.core.models import DeliveryRecord, DeliveryState, WebhookRecord

_OPEN = (int(DeliveryState.PENDING), int(DeliveryState.CLAIMED))


def destination_of(url: str) -> str:
    """scheme://host:port of a URL: the unit of per-destination concurrency."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def webhook_record(row: WebhookRow) -> WebhookRecord:
    return WebhookRecord(row.tenant_id, row.webhook_id, row.url, tuple(row.event_types.split()), row.secret,
                         row.max_attempts, row.create_ms)


def delivery_record(row: DeliveryRow, secret: str = "") -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id=row.delivery_id, tenant_id=row.tenant_id, webhook_id=row.webhook_id, url=row.url,
        destination=row.destination, session_id=row.session_id, event_type=row.event_type, body=row.body,
        state=DeliveryState(row.state), attempts=row.attempts, max_attempts=row.max_attempts,
        next_attempt_ms=row.next_attempt_ms, last_error=row.last_error, last_status=row.last_status,
        create_ms=row.create_ms, delivered_ms=row.delivered_ms, seq=row.seq, claim_token=row.claim_token,
        secret=secret)


def _data(payload: bytes | str) -> Any:
    """An event payload as JSON when it is JSON, else base64 (the store keeps payloads opaque)."""
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raw = payload.encode() if isinstance(payload, str) else payload
        return {"payload_base64": base64.b64encode(raw).decode()}


def outbox_rows(s: Session, tenant_id: str, events: Iterable[tuple[str, str, dict[str, Any]]], now_ms: int) -> int:
    """Queue a delivery of each (webhook event type, session id, data) to each of the tenant's webhooks
    that asked for that type, in the caller's transaction; how many were queued."""
    events = list(events)
    if not events:
        return 0
    hooks = [webhook_record(r) for r in s.execute(select(WebhookRow).where(WebhookRow.tenant_id == tenant_id))
             .scalars()]
    rows = []
    for event_type, session_id, data in events:
        for hook in hooks:
            if event_type not in hook.event_types:
                continue
            delivery_id = uuid.uuid4().hex
            body = {"id": delivery_id, "type": event_type, "tenant_id": tenant_id, "session_id": session_id,
                    "webhook_id": hook.webhook_id, "created_ms": now_ms, "data": data}
            rows.append(DeliveryRow(
                delivery_id=delivery_id, tenant_id=tenant_id, webhook_id=hook.webhook_id, url=hook.url,
                destination=destination_of(hook.url), session_id=session_id, event_type=event_type,
                body=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
                state=int(DeliveryState.PENDING), attempts=0, max_attempts=hook.max_attempts,
                next_attempt_ms=now_ms, claim_token="", claim_expire_ms=0, worker_id="", last_error="",
                last_status=0, create_ms=now_ms, delivered_ms=0))
    s.add_all(rows)
    return len(rows)


def event_data(seq: int, event_type: str, payload: bytes) -> dict[str, Any]:
    return {"seq": seq, "event_type": event_type, "event": _data(payload)}


def task_data(task_id: str, state: str, result_json: str, error: str) -> dict[str, Any]:
    return {"task_id": task_id, "state": state, "result": _data(result_json) if result_json else None,
            "error": error}


class WebhookRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_webhook(self, record: WebhookRecord) -> WebhookRecord:
        def work(s: Session) -> WebhookRecord:
            existing = s.get(WebhookRow, (record.tenant_id, record.webhook_id))
            if existing is not None:
                return webhook_record(existing)  # a retried create
            s.add(WebhookRow(tenant_id=record.tenant_id, webhook_id=record.webhook_id, url=record.url,
                             event_types=" ".join(record.event_types), secret=record.secret,
                             max_attempts=record.max_attempts, create_ms=record.create_ms))
            return record

        return await self.db.write(work)

    async def list_webhooks(self, tenant_id: str, after: str, limit: int) -> list[WebhookRecord]:
        async with self.db.reader() as s:
            query = (select(WebhookRow).where(WebhookRow.tenant_id == tenant_id, WebhookRow.webhook_id > after)
                     .order_by(WebhookRow.webhook_id).limit(limit))
            return [webhook_record(r) for r in (await s.execute(query)).scalars()]

    async def delete_webhook(self, tenant_id: str, webhook_id: str) -> int | None:
        """Drop the webhook and its undelivered deliveries: how many; None if there is no such webhook."""
        def work(s: Session) -> int | None:
            row = s.get(WebhookRow, (tenant_id, webhook_id))
            if row is None:
                return None
            s.delete(row)
            dropped = s.execute(delete(DeliveryRow).where(
                DeliveryRow.tenant_id == tenant_id, DeliveryRow.webhook_id == webhook_id,
                DeliveryRow.state != int(DeliveryState.DELIVERED)).execution_options(synchronize_session=False))
            return int(getattr(dropped, "rowcount", 0) or 0)

        return await self.db.write(work)

    async def claim_deliveries(self, worker_id: str, max_deliveries: int, lease_ms: int,
                               exclude: Sequence[str], now_ms: int,
                               max_per_destination: int = 0) -> list[DeliveryRecord]:
        due = or_(and_(DeliveryRow.state == int(DeliveryState.PENDING), DeliveryRow.next_attempt_ms <= now_ms),
                  and_(DeliveryRow.state == int(DeliveryState.CLAIMED), DeliveryRow.claim_expire_ms < now_ms))
        # Idle workers poll: a read on a reader connection answers "nothing due" without taking the writer.
        async with self.db.reader() as reader:
            if (await reader.execute(select(DeliveryRow.seq).where(due).limit(1))).first() is None:
                return []

        def work(s: Session) -> list[DeliveryRecord]:
            earlier = aliased(DeliveryRow)
            waiting_behind = exists().where(earlier.tenant_id == DeliveryRow.tenant_id,
                                            earlier.webhook_id == DeliveryRow.webhook_id,
                                            earlier.session_id == DeliveryRow.session_id,
                                            earlier.seq < DeliveryRow.seq, earlier.state.in_(_OPEN))
            query = select(DeliveryRow.seq, DeliveryRow.destination).where(due, ~waiting_behind)
            if exclude:
                query = query.where(DeliveryRow.destination.not_in(list(exclude)))
            # With a per-destination limit, look further so that busy destinations do not fill the batch.
            window = max_deliveries * 8 + 16 if max_per_destination else max_deliveries
            # SKIP LOCKED: concurrent claimers on PostgreSQL take disjoint rows (SQLite has one writer anyway).
            candidates = s.execute(query.order_by(DeliveryRow.seq).limit(window)
                                   .with_for_update(skip_locked=True)).all()
            seqs: list[int] = []
            taken: dict[str, int] = {}
            for seq, destination in candidates:
                if max_per_destination and taken.get(destination, 0) >= max_per_destination:
                    continue
                taken[destination] = taken.get(destination, 0) + 1
                seqs.append(seq)
                if len(seqs) >= max_deliveries:
                    break
            if not seqs:
                return []
            token = uuid.uuid4().hex
            rows = list(s.execute(
                update(DeliveryRow).where(DeliveryRow.seq.in_(seqs))
                .values(state=int(DeliveryState.CLAIMED), claim_token=token, claim_expire_ms=now_ms + lease_ms,
                        worker_id=worker_id, attempts=DeliveryRow.attempts + 1)
                .returning(DeliveryRow).execution_options(synchronize_session=False)).scalars())
            keys = {(r.tenant_id, r.webhook_id) for r in rows}
            secrets = {(t, w): secret for t, w, secret in s.execute(
                select(WebhookRow.tenant_id, WebhookRow.webhook_id, WebhookRow.secret)
                .where(WebhookRow.webhook_id.in_({w for _, w in keys}))).all() if (t, w) in keys}
            return sorted((delivery_record(r, secrets.get((r.tenant_id, r.webhook_id), "")) for r in rows),
                          key=lambda d: d.seq)

        return await self.db.write(work, WritePriority.URGENT)

    async def finish_delivery(self, delivery_id: str, claim_token: str, delivered: bool, error: str,
                              http_status: int, retry_after_ms: int, now_ms: int) -> DeliveryRecord:
        def work(s: Session) -> DeliveryRecord:
            row = s.execute(select(DeliveryRow).where(DeliveryRow.delivery_id == delivery_id)
                            .with_for_update()).scalar_one_or_none()
            if row is None:
                raise NotFound(f"delivery {delivery_id!r} not found", reason="DELIVERY_NOT_FOUND")
            if row.state != int(DeliveryState.CLAIMED) or row.claim_token != claim_token:
                raise FailedPrecondition(f"delivery {delivery_id!r}: the claim token does not hold the claim",
                                         reason="CLAIM_LOST", field="claim_token")
            row.claim_token = ""
            row.claim_expire_ms = 0
            row.last_status = http_status
            if delivered:
                row.state = int(DeliveryState.DELIVERED)
                row.delivered_ms = now_ms
                row.last_error = ""
            else:
                row.last_error = error
                out_of_attempts = row.attempts >= row.max_attempts
                row.state = int(DeliveryState.DEAD if out_of_attempts else DeliveryState.PENDING)
                row.next_attempt_ms = now_ms + max(0, retry_after_ms)
            return delivery_record(row)

        return await self.db.write(work, WritePriority.URGENT)

    async def list_deliveries(self, tenant_id: str, state: DeliveryState, after: int,
                              limit: int) -> list[DeliveryRecord]:
        async with self.db.reader() as s:
            query = (select(DeliveryRow).where(DeliveryRow.tenant_id == tenant_id, DeliveryRow.state == int(state),
                                               DeliveryRow.seq > after).order_by(DeliveryRow.seq).limit(limit))
            return [delivery_record(r) for r in (await s.execute(query)).scalars()]

    async def replay_deliveries(self, tenant_id: str, delivery_ids: Sequence[str], now_ms: int) -> int:
        def work(s: Session) -> int:
            query = (update(DeliveryRow).where(DeliveryRow.tenant_id == tenant_id,
                                               DeliveryRow.state == int(DeliveryState.DEAD))
                     .values(state=int(DeliveryState.PENDING), attempts=0, next_attempt_ms=now_ms)
                     .execution_options(synchronize_session=False))
            if delivery_ids:
                query = query.where(DeliveryRow.delivery_id.in_(list(delivery_ids)))
            return int(getattr(s.execute(query), "rowcount", 0) or 0)

        return await self.db.write(work)

    async def delete_delivered(self, cutoff_ms: int, max_rows: int) -> int:
        """Retention: delivered rows delivered before ``cutoff_ms`` go (pending and dead ones stay)."""
        return await delete_batch(self.db, DeliveryRow.seq, [DeliveryRow.state == int(DeliveryState.DELIVERED),
                                                             DeliveryRow.delivered_ms < cutoff_ms], max_rows)

    async def outbox_stats(self, now_ms: int) -> list[tuple[str, int, float, int]]:
        """(destination, pending, age in seconds of the oldest pending, dead) per destination."""
        async with self.db.reader() as s:
            open_rows = (await s.execute(
                select(DeliveryRow.destination, func.count(), func.min(DeliveryRow.create_ms))
                .where(DeliveryRow.state.in_(_OPEN)).group_by(DeliveryRow.destination))).all()
            dead = dict((await s.execute(
                select(DeliveryRow.destination, func.count()).where(DeliveryRow.state == int(DeliveryState.DEAD))
                .group_by(DeliveryRow.destination))).all())
        stats = {d: (int(n), max(0.0, (now_ms - int(oldest)) / 1000), dead.get(d, 0)) for d, n, oldest in open_rows}
        for destination, count in dead.items():
            stats.setdefault(destination, (0, 0.0, int(count)))
        return [(d, *values) for d, values in sorted(stats.items())]
