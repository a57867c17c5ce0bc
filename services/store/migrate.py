"""python -m services.store.migrate [--database-url URL]: apply Alembic migrations and exit.

The server also migrates at start; this is for operators who migrate first.
"""
from __future__ import annotations

import asyncio
import sys

from services.common.settings import load_settings
from services.store.adapters.database import Database
from services.store.config import Settings


async def _migrate(url: str) -> None:
    db = Database(url)
    try:
        await db.migrate()
    finally:
        await db.close()


def main() -> None:
    settings = load_settings(Settings, "store", sys.argv[1:])
    url = settings.resolved_database_url()
    asyncio.run(_migrate(url))
    print(f"store schema is at head ({url.split('@')[-1]})")


if __name__ == "__main__":
    main()
