"""A throw-away PostgreSQL cluster on loopback: ``make run DB=postgres`` and the tests run the store on one.

``initdb`` makes the cluster in a new temporary folder (trust authentication
for user ``postgres``, no password), ``pg_ctl`` starts it on the port given,
listening on 127.0.0.1 only, and on exit it is stopped and its folder
deleted, also when the start fails halfway::

    with postgres_cluster(port) as cluster:
        url = cluster.create_database("llmesh")    # postgresql+psycopg://postgres@127.0.0.1:PORT/llmesh

PostgreSQL refuses to run as root, so as root its binaries run as the
``postgres`` user (``runuser -u postgres --``), which the Debian package
creates. Binaries come from ``$LLMESH_PG_BIN``, then
/usr/lib/postgresql/<version>/bin (newest first), then PATH;
``scripts/system_deps.sh`` (``make system-deps``) installs them with apt.

Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``):
the cluster lives as long as one mesh or one test run and is never reused.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RUN_AS = "postgres"
PG_VERSIONS_DIR = Path("/usr/lib/postgresql")
START_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 120


def database_url(port: int, database: str) -> str:
    """The SQLAlchemy URL of ``database`` in a cluster of this module on 127.0.0.1:``port``."""
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing, or the cluster did not start (the message says why)."""


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    candidates: list[Path] = []
    if os.environ.get("LLMESH_PG_BIN"):
        candidates.append(Path(os.environ["LLMESH_PG_BIN"]))
    versions = sorted(PG_VERSIONS_DIR.glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    candidates.extend(versions)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


@dataclass
class PostgresCluster:
    """One cluster under ``root``; ``url()`` points at one of its databases."""

    bin_dir: Path
    root: Path
    port: int = 0
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` (the store's ``database_url``)."""
        return database_url(self.port, database)

    def create_database(self, name: str) -> str:
        """Create the empty database ``name`` and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database with a name not used before in this cluster; its URL."""
        return self.create_database(f"{prefix}_{os.getpid()}_{next(self._names)}")

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)

    def start(self, port: int) -> None:
        """initdb, then pg_ctl start on 127.0.0.1:``port``; PostgresUnavailable says why when either fails."""
        self.port = port
        options = (f"-p {port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        steps = {
            "initdb": ("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "--no-sync",
                       "-E", "UTF8", "--locale=C"),
            "pg_ctl start": ("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.log_path),
                             "-w", "-t", str(START_TIMEOUT_S), "start"),
        }
        for step, args in steps.items():
            try:
                self._run(*args)
            except subprocess.CalledProcessError as exc:
                output = (exc.stderr or exc.stdout or "").strip()
                raise PostgresUnavailable(f"{self._where()}: {step} exited with {exc.returncode}: "
                                          f"{output}{self._log_tail()}") from None
            except subprocess.TimeoutExpired:
                raise PostgresUnavailable(f"{self._where()}: {step} took over {COMMAND_TIMEOUT_S} s"
                                          f"{self._log_tail()}") from None

    def _where(self) -> str:
        return f"PostgreSQL did not start on 127.0.0.1:{self.port} (cluster in {self.root}, removed)"

    def _log_tail(self, lines: int = 10) -> str:
        try:
            with self.log_path.open(encoding="utf-8", errors="replace") as f:
                tail = "".join(deque(f, maxlen=lines))
        except OSError:
            return ""
        return f"\nlast lines of {self.log_path}:\n{tail}" if tail else ""

    def stop(self) -> None:
        """Stop the server if it runs (a cluster that never started is left alone)."""
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def postgres_cluster(port: int) -> Iterator[PostgresCluster]:
    """Start a cluster on 127.0.0.1:``port``, yield it, then stop it and delete its folder.

    Raises PostgresUnavailable when the binaries are missing or the server does not start; nothing is left behind.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: install the postgresql "
                                  "package (make system-deps does, as root) or set LLMESH_PG_BIN")
    root = Path(tempfile.mkdtemp(prefix="llmesh-pg-"))
    cluster = PostgresCluster(bin_dir, root)
    try:
        if os.geteuid() == 0:
            try:
                shutil.chown(root, RUN_AS, RUN_AS)
            except LookupError:
                raise PostgresUnavailable(f"as root, PostgreSQL runs as user {RUN_AS!r}, which does not exist "
                                          "(the postgresql package creates it)") from None
        cluster.start(port)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
