"""A throw-away PostgreSQL cluster for tests (services/postgres_cluster.py, which ``make run DB=postgres`` uses too).

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
import os
from collections.abc import Iterator

import pytest

from services.postgres_cluster import RUN_AS, PostgresCluster, PostgresUnavailable, find_pg_bin
from services.postgres_cluster import postgres_cluster as _cluster_on
from tests.support.ports import free_port

__all__ = ["RUN_AS", "PostgresCluster", "find_pg_bin", "postgres_cluster", "postgres_cluster_fixture",
           "skip_or_fail"]


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Start a cluster on a free port, yield it, then stop it and delete its files."""
    with _cluster_on(free_port()) as cluster:
        yield cluster


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
        except PostgresUnavailable as exc:
            pytest.fail(f"could not start PostgreSQL: {exc}", pytrace=False)

    return _fixture
