"""A throw-away PostgreSQL cluster for tests.

Usage from any service's tests (conftest.py or a test module)::

    from tests.support.postgres import postgres_cluster_fixture
    postgres_cluster = postgres_cluster_fixture()          # session-scoped fixture

    async def test_something(postgres_cluster):
        url = postgres_cluster.new_database()              # fresh, empty database
        # url is a SQLAlchemy URL: postgresql+psycopg://postgres@127.0.0.1:PORT/NAME

The cluster is created with ``initdb`` in a temporary directory, started with
``pg_ctl`` on a free loopback port (trust auth, no password) and removed when
the fixture's scope ends. PostgreSQL refuses to run as root, so when the tests
run as root the binaries run as the ``postgres`` user via ``runuser``.

Binaries are looked up in ``$LLMESH_PG_BIN``, then /usr/lib/postgresql/<ver>/bin
(newest first), then PATH. Without them the tests skip with the reason, except
when ``$CI`` is set: there a missing server is a failure, not a skip.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.ports import free_port

RUN_AS = "postgres"


def find_pg_bin() -> Path | None:
    candidates: list[Path] = []
    if os.environ.get("LLMESH_PG_BIN"):
        candidates.append(Path(os.environ["LLMESH_PG_BIN"]))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
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
    """A running cluster; ``url`` points at its ``postgres`` database."""

    bin_dir: Path
    root: Path
    port: int = 0
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        self.port = free_port()
        # fsync off: a test cluster is thrown away, and it keeps tests fast.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.root / "server.log"),
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Start a cluster, yield it, then stop it and delete its files."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix="llmesh-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, RUN_AS, RUN_AS)
    cluster = PostgresCluster(bin_dir, root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def skip_or_fail(reason: str) -> None:
    """Skip locally; in CI (env CI set) a missing prerequisite is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this does not skip)", pytrace=False)
    pytest.skip(reason)


def postgres_cluster_fixture(scope: str = "session"):
    """A pytest fixture yielding a PostgresCluster (skips or fails when unavailable)."""

    @pytest.fixture(scope=scope)
    def _fixture() -> Iterator[PostgresCluster]:
        if find_pg_bin() is None:
            skip_or_fail("PostgreSQL server binaries not found (install the postgresql package or set LLMESH_PG_BIN)")
        try:
            with postgres_cluster() as cluster:
                yield cluster
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}", pytrace=False)

    return _fixture
