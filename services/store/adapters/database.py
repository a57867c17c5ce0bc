"""Engines and transactions for SQLite (WAL) and PostgreSQL (psycopg 3, pooled).

Writes are plain synchronous SQLAlchemy functions, ``fn(session)``, run whole
in a thread: `Database.write` hands the function over and the event loop
waits for one result. A write transaction therefore never pauses between its
statements for the event loop, which under load is busy with every other
request; SQLite's single writer is held only for the transaction's own work.

SQLite allows one writer at a time: one writer thread runs the transactions
one after another, each starting with BEGIN IMMEDIATE so it never has to
upgrade its lock (which is what produces "database is locked"). Waiting
writes are taken by urgency (`WritePriority`): a decision's audit entry or a
session lock, which a caller is blocked on, goes ahead of the bulk of message
and event writes, and housekeeping goes last. PostgreSQL runs writes on a
thread per pooled connection, concurrently, and uses row locks.

Reads stay asynchronous (aiosqlite or async psycopg); on SQLite they use their
own small pool and, thanks to WAL, never wait for the writer.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, delete, event, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from services.common.errors import DomainError, ResourceExhausted, Unavailable

MIGRATION_LOCK_ID = 74_151_004  # pg_advisory lock key: one migrator at a time

T = TypeVar("T")


@dataclass(frozen=True)
class DatabaseOptions:
    pool_size: int = 10
    pool_max_overflow: int = 10
    sqlite_readers: int = 4
    sqlite_synchronous: str = "FULL"
    sqlite_busy_timeout_ms: int = 10_000


class WritePriority(enum.IntEnum):
    """How urgently a write transaction wants SQLite's single writer."""

    URGENT = 0  # short writes a caller is blocked on: audit entries, session locks, task leases
    NORMAL = 1  # sessions, messages, events, task enqueue and claim
    BACKGROUND = 2  # housekeeping: archiving, expired leases and locks


Job = tuple[Callable[[], Any], concurrent.futures.Future]


class WriteQueue:
    """Write jobs waiting for the writer thread, taken most urgent first (thread-safe).

    FIFO within a level; URGENT jobs always go first (they are few and
    short). A BACKGROUND job that has waited longer than
    ``background_max_wait_s`` goes ahead of NORMAL ones, so housekeeping is
    late under load but never starved.
    """

    def __init__(self, background_max_wait_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._levels: dict[WritePriority, collections.deque] = {p: collections.deque() for p in WritePriority}
        self._background_max_wait_s = background_max_wait_s
        self._clock = clock
        self._closed = False

    def put(self, priority: WritePriority, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable("the store is shutting down", reason="STORE_CLOSING")
            self._levels[priority].append((self._clock(), job))
            self._cond.notify()

    def get(self, timeout_s: float | None = None) -> Job | None:
        """The next job; None once closed and drained (or after ``timeout_s`` with nothing)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or any(self._levels.values()), timeout_s):
                return None
            return self._pick()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return sum(len(level) for level in self._levels.values())

    def _pick(self) -> Job | None:
        urgent, normal, background = (self._levels[p] for p in WritePriority)
        if urgent:
            return urgent.popleft()[1]
        if background and (not normal or self._clock() - background[0][0] > self._background_max_wait_s):
            return background.popleft()[1]
        if normal:
            return normal.popleft()[1]
        return None


class WriterThread:
    """SQLite's one writer: runs queued jobs one at a time, most urgent first."""

    def __init__(self, name: str) -> None:
        self.queue = WriteQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: WritePriority, fn: Callable[[], T]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put(priority, (fn, future))
        return future

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started: nothing was written
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self) -> None:
        """Run what is queued, then stop."""
        self.queue.close()
        self._thread.join()


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
        self._writer_thread: WriterThread | None = None
        self._write_pool: concurrent.futures.ThreadPoolExecutor | None = None
        if self.dialect == "sqlite":
            database = self.url.database or ""
            if not database or database == ":memory:":
                raise ValueError("SQLite needs a file path (WAL and several connections)")
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.write_engine: Engine = create_engine(self.url.set(drivername="sqlite+pysqlite"), pool_size=1,
                                                      max_overflow=0)
            self._sqlite_setup(self.write_engine, immediate=True)
            self.read_engine = create_async_engine(self.url, pool_size=options.sqlite_readers, max_overflow=0)
            self._sqlite_setup(self.read_engine.sync_engine, immediate=False)
            self._writer_thread = WriterThread(name="sqlite-writer")
        elif self.dialect == "postgresql":
            self.write_engine = create_engine(self.url, pool_size=options.pool_size,
                                              max_overflow=options.pool_max_overflow, pool_pre_ping=True)
            self.read_engine = create_async_engine(
                self.url, pool_size=options.pool_size, max_overflow=options.pool_max_overflow,
                pool_pre_ping=True)
            self._write_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=options.pool_size + options.pool_max_overflow, thread_name_prefix="pg-writer")
        else:
            raise ValueError(f"unsupported database {self.dialect!r}; use sqlite or postgresql")
        self._writes = sessionmaker(self.write_engine, expire_on_commit=False)
        self._reads = async_sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def _sqlite_setup(self, engine: Engine, *, immediate: bool) -> None:
        synchronous = self.options.sqlite_synchronous.upper()
        if synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"sqlite_synchronous: unknown level {synchronous!r}")
        busy_ms = int(self.options.sqlite_busy_timeout_ms)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: object) -> None:  # the driver's own connection
            # We issue BEGIN ourselves (below) instead of the driver's implicit one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    async def write(self, fn: Callable[[Session], T], priority: WritePriority = WritePriority.NORMAL) -> T:
        """Run ``fn(session)`` in one write transaction on a writer thread.

        Commits when ``fn`` returns, rolls back when it raises. ``priority``
        orders waiting writes on SQLite (see `WritePriority`); PostgreSQL
        writes run concurrently and ignore it. A caller cancelled before its
        transaction starts writes nothing; one cancelled later still commits
        (callers retry with idempotency keys).
        """
        def transaction() -> T:
            try:
                with self._writes() as session, session.begin():
                    return fn(session)
            except OperationalError as exc:
                storage_error = storage_failure(exc)
                if storage_error is None:
                    raise
                raise storage_error from exc

        return await self._run_in_writer(transaction, priority)

    async def _run_in_writer(self, fn: Callable[[], T], priority: WritePriority) -> T:
        if self._writer_thread is not None:
            future = self._writer_thread.submit(priority, fn)
        else:
            assert self._write_pool is not None
            future = self._write_pool.submit(fn)
        return await asyncio.wrap_future(future)

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        async with self._reads() as session, session.begin():
            yield session

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        from services.store.adapters.migrations.runner import upgrade_to_head

        def run() -> None:
            with self.write_engine.begin() as conn:
                if self.is_postgres:
                    # Replicas starting together: the second waits, then finds nothing to do.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_ID})
                upgrade_to_head(conn)

        await self._run_in_writer(run, WritePriority.URGENT)

    async def close(self) -> None:
        if self._writer_thread is not None:
            await asyncio.to_thread(self._writer_thread.close)
        if self._write_pool is not None:
            await asyncio.to_thread(self._write_pool.shutdown, True)
        await asyncio.to_thread(self.write_engine.dispose)
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


async def delete_batch(db: Database, key: Any, conditions: Sequence[Any], max_rows: int) -> int:
    """Retention: delete up to ``max_rows`` rows matching ``conditions``, lowest ``key`` (an integer
    primary key column) first, in one background transaction; how many went."""
    def work(s: Session) -> int:
        query = select(key).where(*conditions).order_by(key).limit(max_rows).with_for_update(skip_locked=True)
        keys = list(s.execute(query).scalars())
        if keys:
            s.execute(delete(key.class_).where(key.in_(keys)).execution_options(synchronize_session=False))
        return len(keys)

    return await db.write(work, WritePriority.BACKGROUND)
