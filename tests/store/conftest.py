"""Store fixtures: a migrated database on each backend, a core, a running service."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.store.adapters.database import Database
from services.store.adapters.repository import SqlRepository
from tests.support.postgres import PostgresCluster, postgres_cluster_fixture

postgres_cluster = postgres_cluster_fixture()


def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database("store")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return database_url(backend, tmp_path, request)


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = Database(db_url)
    await db.migrate()
    yield db
    await db.close()


@pytest.fixture
def repo(database: Database) -> SqlRepository:
    return SqlRepository(database)
