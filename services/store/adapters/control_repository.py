"""Session controls in SQL. A post takes the controls counter first (adapters/counters.py).

The counter's row lock hands out seqs in commit order and serialises posts
across store replicas, so a repeated request_id finds the first control
instead of racing it into the unique constraint.
"""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.common.errors import NotFound
from services.store.adapters.counters import counter_values, lock_counter, set_counter
from services.store.adapters.database import Database, WritePriority, delete_batch
from services.store.adapters.records import control_record
from services.store.adapters.tables import SessionControlRow, SessionRow
from services.store.core.feeds import APPROVALS_FEED, CONTROLS_FEED, FEED_CHANNEL
from services.store.core.models import NewSessionControl, SessionControlRecord

#: The feeds whose heads `feed_heads` reads: each counter's name is its feed's.
_FEEDS = (APPROVALS_FEED, CONTROLS_FEED)


class ControlRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _posted(s: Session, tenant_id: str, request_id: str) -> SessionControlRow | None:
        if not request_id:
            return None
        query = select(SessionControlRow).where(SessionControlRow.tenant_id == tenant_id,
                                                SessionControlRow.request_id == request_id)
        return s.execute(query).scalar_one_or_none()

    async def post_session_control(self, new: NewSessionControl, now_ms: int) -> tuple[SessionControlRecord, bool]:
        def work(s: Session) -> tuple[SessionControlRecord, bool]:
            found = self._posted(s, new.tenant_id, new.request_id)
            if found is not None:
                return control_record(found), False
            if s.get(SessionRow, (new.tenant_id, new.session_id)) is None:
                # Same answer for an unused id and another tenant's session.
                raise NotFound(f"session {new.session_id!r} not found", reason="SESSION_NOT_FOUND",
                               field="control.session_id")
            seq = lock_counter(s, CONTROLS_FEED) + 1
            found = self._posted(s, new.tenant_id, new.request_id)  # posted by another replica meanwhile
            if found is not None:
                return control_record(found), False
            row = SessionControlRow(seq=seq, tenant_id=new.tenant_id, session_id=new.session_id,
                                    kind=new.kind.value, run_id=new.run_id, payload_json=new.payload_json,
                                    request_id=new.request_id or None, create_ms=now_ms)
            s.add(row)
            set_counter(s, CONTROLS_FEED, seq)
            return control_record(row), True

        return await self.db.write(work, WritePriority.URGENT)

    async def session_controls_after(self, seq: int, tenant_id: str, session_id: str,
                                     limit: int) -> list[SessionControlRecord]:
        """Controls past ``seq`` in seq order: one tenant's (one session's), or every tenant's for ""."""
        query = select(SessionControlRow).where(SessionControlRow.seq > seq)
        if tenant_id:
            query = query.where(SessionControlRow.tenant_id == tenant_id)
        if session_id:
            query = query.where(SessionControlRow.session_id == session_id)
        query = query.order_by(SessionControlRow.seq).limit(limit)
        async with self.db.reader() as s:
            return [control_record(r) for r in (await s.execute(query)).scalars()]

    async def delete_old_session_controls(self, cutoff_ms: int, max_rows: int) -> int:
        return await delete_batch(self.db, SessionControlRow.seq, [SessionControlRow.create_ms < cutoff_ms], max_rows)

    async def feed_heads(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The counter of each feed key ``("", feed)`` asked for (the poller of the feed hub reads these)."""
        names = [feed for channel, feed in keys if channel == FEED_CHANNEL and feed in _FEEDS]
        values = await counter_values(self.db, names)
        return {(FEED_CHANNEL, name): value for name, value in values.items()}
