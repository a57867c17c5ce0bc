"""Store-wide counters (``store_counters``): the seqs of the approval and session-control feeds.

A writer takes its counter with a row lock (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite's single writer serialises anyway) and keeps it until it
commits, so the next writer reads the value only after that commit: seqs
follow commit order, and a watcher that knows seq N committed knows every
seq below it is. The lock also serialises a feed's writers across store
replicas, which makes get-or-create and compare-and-set steps atomic.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.store.adapters.database import Database
from services.store.adapters.tables import CounterRow


def insert_ignoring_conflict(s: Session, table: type[Any], values: dict[str, Any]) -> None:
    """INSERT a row unless one with its primary key exists (then nothing)."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        s.execute(postgresql_insert(table).values(**values).on_conflict_do_nothing())
        return
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    s.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing())


def lock_counter(s: Session, name: str) -> int:
    """The counter's value, row-locked until the transaction ends (created at 0 the first time)."""
    query = select(CounterRow.value).where(CounterRow.name == name).with_for_update()
    value = s.execute(query).scalar_one_or_none()
    if value is None:
        insert_ignoring_conflict(s, CounterRow, {"name": name, "value": 0})
        value = s.execute(query).scalar_one()
    return value


def set_counter(s: Session, name: str, value: int) -> None:
    """Move a counter this transaction holds (see `lock_counter`)."""
    s.execute(update(CounterRow).where(CounterRow.name == name).values(value=value)
              .execution_options(synchronize_session=False))


async def counter_values(db: Database, names: list[str]) -> dict[str, int]:
    """Committed values of the named counters (0 for one never moved)."""
    if not names:
        return {}
    async with db.reader() as s:
        rows = (await s.execute(select(CounterRow.name, CounterRow.value).where(CounterRow.name.in_(names)))).all()
    found = {name: value for name, value in rows}
    return {name: found.get(name, 0) for name in names}
