"""The store contract on every StorePort the orchestrator can be given.

- memory: the in-process MemoryStore;
- sqlite: the real store service on SQLite, in-process over gRPC, reached
  through the orchestrator's own gRPC store adapter;
- postgres: the same on a throw-away PostgreSQL cluster (skipped, saying
  why, when the PostgreSQL server binaries are not installed).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.runtime import running_service
from services.orchestrator.adapters.grpc_store import GrpcStore
from services.orchestrator.adapters.memory_store import MemoryStore, TaskRetry
from services.orchestrator.core.ports import StorePort
from services.store.config import Settings
from services.store.server import build_app
from tests.orchestrator.store_contract import CONTRACT_TIMING, StoreContract
from tests.orchestrator.store_contract_replicas import ReplicaStoreContract
from tests.support.auth import service_channel
from tests.support.postgres import PostgresCluster, postgres_cluster_fixture

postgres_cluster = postgres_cluster_fixture()


def memory_store() -> MemoryStore:
    timing = CONTRACT_TIMING
    return MemoryStore(retry=TaskRetry(default_max_attempts=timing.default_max_attempts,
                                       backoff_base_ms=timing.backoff_base_ms, backoff_max_ms=timing.backoff_max_ms))


async def served_store(tmp_path: Path, database_url: str) -> AsyncIterator[StorePort]:
    timing = CONTRACT_TIMING
    settings = Settings(port=0, data_dir=str(tmp_path), database_url=database_url,
                        task_max_attempts=timing.default_max_attempts, task_backoff_base_ms=timing.backoff_base_ms,
                        task_backoff_max_ms=timing.backoff_max_ms,
                        lease_sweep_interval_ms=timing.lease_sweep_interval_ms)
    async with running_service(build_app(settings), settings) as service, \
            service_channel(f"127.0.0.1:{service.port}", "orchestrator") as channel:
        yield GrpcStore.for_channel(channel)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorePort]:
    if request.param == "memory":
        yield memory_store()
        return
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        url = cluster.new_database("contract")
    async for port in served_store(tmp_path, url):
        yield port


class TestStoreContract(StoreContract, ReplicaStoreContract):
    pass
