"""Store services for tests: one or more in-process replicas of the store on one database."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.store.config import Settings
from services.store.server import App
from tests.support.auth import service_channel


@contextlib.asynccontextmanager
async def store_replica(db_url: str, data_dir: Path, **overrides: Any) -> AsyncIterator[str]:
    """A running store service on ``db_url``; yields its address."""
    settings = Settings(**{"port": 0, "data_dir": str(data_dir), "database_url": db_url,
                           "lease_sweep_interval_ms": 50, **overrides})
    async with running_service(App(settings), settings) as svc:
        yield f"127.0.0.1:{svc.port}"


@contextlib.asynccontextmanager
async def stub_for(address: str, service: str) -> AsyncIterator[store_pb2_grpc.StoreServiceStub]:
    """A store stub calling as the mesh service ``service`` (policy owns approvals, orchestrator controls)."""
    async with service_channel(address, service) as channel:
        yield store_pb2_grpc.StoreServiceStub(channel)


async def expect_error(call, code: grpc.StatusCode, reason: str | None = None,
                       field: str | None = None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    info = error_info(err.value)
    if reason is not None:
        assert info is not None and info.reason == reason, (info, err.value.details())
    if field is not None:
        assert info is not None and info.metadata["field"] == field, (info, err.value.details())
    return err.value


async def new_session(stub: store_pb2_grpc.StoreServiceStub, tenant: str = "acme", session_id: str = "s1") -> None:
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id, title="t"))
