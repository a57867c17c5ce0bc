"""Sessions, messages and events in SQL. Every query is filtered by tenant_id."""
from __future__ import annotations

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from services.common.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound
from services.store.adapters.database import Database, WritePriority
from services.store.adapters.records import event_record, message_record, session_record
from services.store.adapters.tables import ArchivedEventRow, EventRow, MessageRow, SessionLockRow, SessionRow
from services.store.adapters.webhook_repository import event_data, outbox_rows
from services.store.core.models import (
    WEBHOOK_TYPE_OF_EVENT,
    EventAppend,
    EventRecord,
    MessageRecord,
    NewMessage,
    NewSession,
    SessionRecord,
)

# Keys per OR list: SQLite nests "a OR b OR ..." one level per term and
# refuses expressions deeper than 1000.
KEYS_PER_QUERY = 200


def rows_with_keys(columns, keys):
    """WHERE (c1 = k1 AND c2 = k2 ...) OR ... for composite keys.

    A row-value ``(c1, c2) IN (VALUES ...)``, which is what ``tuple_().in_()``
    renders on SQLite, is answered by a full table scan there; the OR of
    equalities is answered from the key's index on SQLite and PostgreSQL alike.
    """
    return or_(*(and_(*(column == value for column, value in zip(columns, key, strict=True))) for key in keys))


def sessions_where(keys, tenant_column=SessionRow.tenant_id, session_column=SessionRow.session_id):
    """WHERE for the session rows (or another table's rows keyed by session) of these
    (tenant_id, session_id) keys.

    One term per tenant, ``tenant_id = t AND session_id IN (...)``: answered
    from the primary key on SQLite and PostgreSQL, and, unlike one equality
    pair per key, cheap to build for a batch of hundreds of sessions.
    """
    by_tenant: dict[str, list[str]] = {}
    for tenant_id, session_id in sorted(keys):
        by_tenant.setdefault(tenant_id, []).append(session_id)
    return or_(*(and_(tenant_column == tenant_id, session_column.in_(session_ids))
                 for tenant_id, session_ids in by_tenant.items()))


def lock_tokens(s: Session, keys) -> dict[tuple[str, str], int]:
    """The current fencing token of these sessions' locks (a session never locked has none: 0).

    Read FOR SHARE on PostgreSQL: a lock changing hands waits for this
    transaction, so every write accepted under the old token commits before
    the new holder is granted the lock (and reads the next event seq).
    """
    keys = sorted(keys)
    if not keys:
        return {}
    query = (select(SessionLockRow.tenant_id, SessionLockRow.session_id, SessionLockRow.fencing_token)
             .where(sessions_where(keys, SessionLockRow.tenant_id, SessionLockRow.session_id))
             .order_by(SessionLockRow.tenant_id, SessionLockRow.session_id).with_for_update(read=True))
    return {(t, sid): token for t, sid, token in s.execute(query).all()}


def stale_lock_owner(session_id: str, fencing_token: int, current: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"fencing_token {fencing_token} is stale: the lock of session {session_id!r} has changed hands since "
        f"(its token is {current}); nothing was written", reason="STALE_LOCK_OWNER", field="fencing_token",
        metadata={"current_fencing_token": str(current)})


def known_keys_query(wanted: set[tuple[str, str, str]]):
    """Seqs of the events already stored under these (tenant, session, idempotency key) triples."""
    by_session: dict[tuple[str, str], list[str]] = {}
    for tenant_id, session_id, key in sorted(wanted):
        by_session.setdefault((tenant_id, session_id), []).append(key)
    # One index range per session: tenant and session equal, the key IN the batch's keys.
    return select(EventRow.tenant_id, EventRow.session_id, EventRow.idempotency_key, EventRow.seq).where(or_(*(
        and_(EventRow.tenant_id == tenant_id, EventRow.session_id == session_id, EventRow.idempotency_key.in_(keys))
        for (tenant_id, session_id), keys in by_session.items())))


def _session_not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND")


def _lock_session(s: Session, tenant_id: str, session_id: str, column):
    """The session's ``column`` under its row lock; None when there is no such session."""
    # FOR UPDATE serializes appends to one session on PostgreSQL; SQLite
    # ignores it and is already serialized by its single writer.
    query = (select(column).where(SessionRow.tenant_id == tenant_id, SessionRow.session_id == session_id)
             .with_for_update())
    return s.execute(query).scalar_one_or_none()


class SessionRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_session(self, new: NewSession, now_ms: int) -> tuple[SessionRecord, bool]:
        def work(s: Session) -> tuple[SessionRecord, bool]:
            if new.request_id:
                query = select(SessionRow).where(SessionRow.tenant_id == new.tenant_id,
                                                 SessionRow.create_request_id == new.request_id)
                existing = s.execute(query).scalar_one_or_none()
                if existing is not None:
                    return session_record(existing), False
            clash = s.get(SessionRow, (new.tenant_id, new.session_id))
            if clash is not None:
                raise AlreadyExists(f"session {new.session_id!r} already exists", reason="SESSION_EXISTS",
                                    field="session_id")
            row = SessionRow(tenant_id=new.tenant_id, session_id=new.session_id, title=new.title,
                             metadata_json=new.metadata_json, create_request_id=new.request_id or None,
                             last_message_position=0, last_event_seq=0, create_ms=now_ms, update_ms=now_ms)
            s.add(row)
            return session_record(row), True

        return await self.db.write(work)

    async def get_session(self, tenant_id: str, session_id: str) -> SessionRecord | None:
        async with self.db.reader() as s:
            row = await s.get(SessionRow, (tenant_id, session_id))
            return session_record(row) if row is not None else None

    async def list_sessions(self, tenant_id: str, after: tuple[int, str] | None, limit: int) -> list[SessionRecord]:
        query = select(SessionRow).where(SessionRow.tenant_id == tenant_id)
        if after is not None:
            query = query.where(or_(SessionRow.create_ms > after[0],
                                    and_(SessionRow.create_ms == after[0], SessionRow.session_id > after[1])))
        query = query.order_by(SessionRow.create_ms, SessionRow.session_id).limit(limit)
        async with self.db.reader() as s:
            return [session_record(r) for r in (await s.execute(query)).scalars()]

    async def append_messages(self, tenant_id: str, session_id: str, messages: list[NewMessage],
                              request_id: str, now_ms: int, fencing_token: int = 0) -> list[int]:
        def work(s: Session) -> list[int]:
            last_position = _lock_session(s, tenant_id, session_id, SessionRow.last_message_position)
            if last_position is None:
                raise _session_not_found(session_id)
            if fencing_token:
                current = lock_tokens(s, [(tenant_id, session_id)]).get((tenant_id, session_id), 0)
                if current != fencing_token:
                    raise stale_lock_owner(session_id, fencing_token, current)
            if request_id:
                query = (select(MessageRow.position).where(
                    MessageRow.tenant_id == tenant_id, MessageRow.session_id == session_id,
                    MessageRow.request_id == request_id).order_by(MessageRow.position))
                done = list(s.execute(query).scalars())
                if done:
                    return done
            first = last_position + 1
            positions = list(range(first, first + len(messages)))
            s.execute(insert(MessageRow), [
                dict(tenant_id=tenant_id, session_id=session_id, position=pos, request_id=request_id or None,
                     role=m.role, content=m.content, metadata_json=m.metadata_json, num_tokens=m.num_tokens,
                     create_ms=now_ms)
                for pos, m in zip(positions, messages, strict=True)])
            # Bulk UPDATE by primary key: a plain statement, no ORM object to flush.
            s.execute(update(SessionRow), [dict(tenant_id=tenant_id, session_id=session_id,
                                                last_message_position=positions[-1], update_ms=now_ms)])
            return positions

        return await self.db.write(work)

    async def list_messages(self, tenant_id: str, session_id: str, after_position: int,
                            limit: int) -> list[MessageRecord]:
        query = (select(MessageRow).where(MessageRow.tenant_id == tenant_id, MessageRow.session_id == session_id,
                                          MessageRow.position > after_position)
                 .order_by(MessageRow.position).limit(limit))
        async with self.db.reader() as s:
            return [message_record(r) for r in (await s.execute(query)).scalars()]

    async def append_events(self, appends: list[EventAppend], now_ms: int) -> list[list[int] | DomainError]:
        """One transaction for the whole batch; per append its seqs or its own error."""
        keys = sorted({(a.tenant_id, a.session_id) for a in appends})

        def work(s: Session) -> list[list[int] | DomainError]:
            # Lock every session of the batch in one sorted pass: concurrent
            # batches from other replicas then cannot deadlock each other.
            query = (select(SessionRow.tenant_id, SessionRow.session_id, SessionRow.last_event_seq)
                     .where(sessions_where(keys))
                     .order_by(SessionRow.tenant_id, SessionRow.session_id).with_for_update())
            last_seq = {(t, sid): seq for t, sid, seq in s.execute(query).all()}
            # Checked here, in the writing transaction: a stale writer fails alone.
            tokens = lock_tokens(s, {(a.tenant_id, a.session_id) for a in appends if a.fencing_token})
            advanced: set[tuple[str, str]] = set()
            known = self._known_keys(s, appends)
            rows: list[dict] = []
            results: list[list[int] | DomainError] = []
            for append in appends:
                session_key = (append.tenant_id, append.session_id)
                if session_key not in last_seq:
                    results.append(_session_not_found(append.session_id))
                    continue
                current = tokens.get(session_key, 0)
                if append.fencing_token and append.fencing_token != current:
                    results.append(stale_lock_owner(append.session_id, append.fencing_token, current))
                    continue
                seqs: list[int] = []
                for event in append.events:
                    key = (append.tenant_id, append.session_id, event.idempotency_key)
                    if event.idempotency_key and key in known:
                        seqs.append(known[key])  # a retry: the original seq, nothing written
                        continue
                    seq = last_seq[session_key] = last_seq[session_key] + 1
                    advanced.add(session_key)
                    if event.idempotency_key:
                        known[key] = seq
                    seqs.append(seq)
                    rows.append(dict(tenant_id=append.tenant_id, session_id=append.session_id, seq=seq,
                                     type=event.type, payload=event.payload,
                                     idempotency_key=event.idempotency_key or None,
                                     schema_version=event.schema_version, create_ms=now_ms))
                results.append(seqs)
            if rows:
                s.execute(insert(EventRow), rows)
                self._queue_webhooks(s, rows, now_ms)
                # Bulk UPDATE by primary key (one executemany) of the sessions that advanced.
                s.execute(update(SessionRow), [
                    dict(tenant_id=t, session_id=sid, last_event_seq=seq, update_ms=now_ms)
                    for (t, sid), seq in last_seq.items() if (t, sid) in advanced])
            return results

        return await self.db.write(work)

    @staticmethod
    def _queue_webhooks(s: Session, rows: list[dict], now_ms: int) -> None:
        """Outbox rows for the events webhooks are told of, in the transaction that stores them."""
        by_tenant: dict[str, list[tuple[str, str, dict]]] = {}
        for row in rows:
            kind = WEBHOOK_TYPE_OF_EVENT.get(row["type"])
            if kind is not None:
                by_tenant.setdefault(row["tenant_id"], []).append(
                    (kind, row["session_id"], event_data(row["seq"], row["type"], row["payload"])))
        for tenant_id, events in by_tenant.items():
            outbox_rows(s, tenant_id, events, now_ms)

    @staticmethod
    def _known_keys(s: Session, appends: list[EventAppend]) -> dict[tuple[str, str, str], int]:
        wanted = {(a.tenant_id, a.session_id, e.idempotency_key) for a in appends for e in a.events
                  if e.idempotency_key}
        if not wanted:
            return {}
        query = known_keys_query(wanted)
        return {(t, sid, k): seq for t, sid, k, seq in s.execute(query).all()}

    async def read_events(self, tenant_id: str, session_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        async with self.db.reader() as s:
            query = (select(EventRow).where(EventRow.tenant_id == tenant_id, EventRow.session_id == session_id,
                                            EventRow.seq > after_seq).order_by(EventRow.seq).limit(limit))
            rows = [event_record(r) for r in (await s.execute(query)).scalars()]
            if rows and rows[0].seq == after_seq + 1:
                return rows
            # Older events may have been archived by retention: replay stays complete.
            archived = (select(ArchivedEventRow).where(
                ArchivedEventRow.tenant_id == tenant_id, ArchivedEventRow.session_id == session_id,
                ArchivedEventRow.seq > after_seq).order_by(ArchivedEventRow.seq).limit(limit))
            old = [event_record(r) for r in (await s.execute(archived)).scalars()]
            return sorted({r.seq: r for r in old + rows}.values(), key=lambda r: r.seq)[:limit]

    async def last_event_seqs(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Last event seq of each (tenant_id, session_id) in ``keys`` that exists."""
        found: dict[tuple[str, str], int] = {}
        async with self.db.reader() as s:
            for i in range(0, len(keys), KEYS_PER_QUERY):
                query = select(SessionRow.tenant_id, SessionRow.session_id, SessionRow.last_event_seq).where(
                    sessions_where(keys[i:i + KEYS_PER_QUERY]))
                found.update({(t, sid): seq for t, sid, seq in (await s.execute(query)).all()})
        return found

    async def archive_events(self, cutoff_ms: int, max_rows: int) -> int:
        return await move_rows(self.db, EventRow, ArchivedEventRow, cutoff_ms, max_rows,
                                (EventRow.tenant_id, EventRow.session_id, EventRow.seq))


async def move_rows(db: Database, hot, archive, cutoff_ms: int, max_rows: int, key_columns, extra=None) -> int:
    """Copy up to max_rows rows older than cutoff into the archive table and delete them."""
    def work(s: Session) -> int:
        query = select(hot).where(hot.create_ms < cutoff_ms)
        if extra is not None:
            query = query.where(extra)
        query = query.order_by(hot.create_ms).limit(max_rows).with_for_update(skip_locked=True)
        rows = list(s.execute(query).scalars())
        if not rows:
            return 0
        columns = [c.key for c in hot.__table__.columns]
        s.execute(insert(archive), [{c: getattr(r, c) for c in columns} for r in rows])
        keys = [tuple(getattr(r, col.key) for col in key_columns) for r in rows]
        for i in range(0, len(keys), KEYS_PER_QUERY):
            s.execute(delete(hot).where(rows_with_keys(key_columns, keys[i:i + KEYS_PER_QUERY])))
        return len(rows)

    return await db.write(work, WritePriority.BACKGROUND)

