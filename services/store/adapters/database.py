"""Engines and transactions for SQLite (aiosqlite, WAL) and PostgreSQL (psycopg 3, pooled).

SQLite allows one writer at a time: writes go through a single connection
behind an asyncio lock and start with BEGIN IMMEDIATE, so a transaction
never has to upgrade its lock (which is what produces "database is locked").
Reads use their own small pool and, thanks to WAL, never wait for the writer.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from services.common.errors import DomainError, ResourceExhausted, Unavailable

MIGRATION_LOCK_ID = 74_151_004  # pg_advisory lock key: one migrator at a time


@dataclass(frozen=True)
class DatabaseOptions:
    pool_size: int = 10
    pool_max_overflow: int = 10
    sqlite_readers: int = 4
    sqlite_synchronous: str = "FULL"
    sqlite_busy_timeout_ms: int = 10_000


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and pick the async drivers we ship."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    return url


class Database:
    def __init__(self, url: str, options: DatabaseOptions = DatabaseOptions()) -> None:
        self.url = make_url(normalize_url(url))
        self.options = options
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite":
            database = self.url.database or ""
            if not database or database == ":memory:":
                raise ValueError("SQLite needs a file path (WAL and several connections)")
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.write_engine = self._sqlite_engine(pool_size=1, immediate=True)
            self.read_engine = self._sqlite_engine(pool_size=options.sqlite_readers, immediate=False)
        elif self.dialect == "postgresql":
            self.write_engine = create_async_engine(
                self.url, pool_size=options.pool_size, max_overflow=options.pool_max_overflow,
                pool_pre_ping=True)
            self.read_engine = self.write_engine
        else:
            raise ValueError(f"unsupported database {self.dialect!r}; use sqlite or postgresql")
        self._writes = async_sessionmaker(self.write_engine, expire_on_commit=False)
        self._reads = async_sessionmaker(self.read_engine, expire_on_commit=False)
        # Only SQLite needs writes serialized in-process; PostgreSQL uses row locks.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.dialect == "sqlite" else None

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def _sqlite_engine(self, *, pool_size: int, immediate: bool) -> AsyncEngine:
        engine = create_async_engine(self.url, pool_size=pool_size, max_overflow=0)
        synchronous = self.options.sqlite_synchronous.upper()
        if synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"sqlite_synchronous: unknown level {synchronous!r}")
        busy_ms = int(self.options.sqlite_busy_timeout_ms)

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # We issue BEGIN ourselves (below) instead of the driver's implicit one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: commits on normal exit, rolls back on error."""
        try:
            if self._write_lock is None:
                async with self._writes() as session, session.begin():
                    yield session
                return
            async with self._write_lock:
                async with self._writes() as session, session.begin():
                    yield session
        except OperationalError as exc:
            storage_error = storage_failure(exc)
            if storage_error is None:
                raise
            raise storage_error from exc

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        async with self._reads() as session, session.begin():
            yield session

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        from services.store.adapters.migrations.runner import upgrade_to_head

        async def _run() -> None:
            async with self.write_engine.begin() as conn:
                if self.is_postgres:
                    # Replicas starting together: the second waits, then finds nothing to do.
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_ID})
                await conn.run_sync(upgrade_to_head)

        if self._write_lock is None:
            await _run()
        else:
            async with self._write_lock:
                await _run()

    async def close(self) -> None:
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()


# SQLite reports a full disk as SQLITE_FULL, and a file size limit or a disk
# quota (EFBIG, EDQUOT) as a failed write; PostgreSQL as SQLSTATE class 53.
_SQLITE_FULL = {"SQLITE_FULL", "SQLITE_IOERR_WRITE"}


def storage_failure(exc: OperationalError) -> DomainError | None:
    """The domain error for a database that cannot store more, else None."""
    orig = getattr(exc, "orig", None)
    sqlite_name = getattr(orig, "sqlite_errorname", "")
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None) or ""
    if sqlite_name in _SQLITE_FULL or sqlstate.startswith("53"):
        return ResourceExhausted("the store cannot write: its disk is full or over quota", reason="STORAGE_FULL")
    if sqlite_name.startswith("SQLITE_IOERR"):
        return Unavailable(f"the store's disk failed a write ({sqlite_name})", reason="STORAGE_IO_ERROR")
    return None
