"""The Alembic migrations produce exactly the schema the models describe."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from services.store.adapters.database import Database
from services.store.adapters.tables import Base


async def test_migrated_schema_matches_models(database: Database) -> None:
    def diff(sync_conn):
        return compare_metadata(MigrationContext.configure(sync_conn), Base.metadata)

    async with database.read_engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_migrate_twice_stays_at_head(database: Database) -> None:
    await database.migrate()  # a restart migrates again: must be harmless
    async with database.read_engine.connect() as conn:
        versions = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalars().all()
    assert versions == ["0003"]
