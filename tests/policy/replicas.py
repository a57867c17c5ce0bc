"""A real store service in process, and policy replicas (PolicyService cores) that share it.

Each replica has its own channel to the store, presenting the policy
service's key, its own store-backed approval book with its own watch, and its
own audit chain writer, as separate policy processes would::

    async with running_store(tmp_path / "store") as store:
        async with policy_replica(store.target) as a, policy_replica(store.target) as b:
            ...
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from services.common.runtime import running_service
from services.policy.adapters.store_approvals import StoreApprovalBook
from services.policy.adapters.store_audit_log import StoreAuditLog
from services.policy.core.audit import AuditChain, AuditLog
from services.policy.core.policy_holder import PolicyHolder
from services.policy.core.policy_service import PolicyService
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store_app
from tests.policy.builders import TEST_KEY, default_policy
from tests.support.auth import service_channel


@dataclass(frozen=True)
class RunningStore:
    target: str
    #: The SQLite file the store keeps its tables in.
    database: Path


@dataclass
class Replica:
    service: PolicyService
    approvals: StoreApprovalBook
    audit_log: AuditLog


@contextlib.asynccontextmanager
async def running_store(data_dir: Path) -> AsyncIterator[RunningStore]:
    settings = StoreSettings(port=0, data_dir=str(data_dir))
    async with running_service(build_store_app(settings), settings) as store:
        yield RunningStore(store.address, data_dir / "store.db")


@contextlib.asynccontextmanager
async def store_approval_book(target: str, *, ttl_s: float = 3600.0, watch: bool = True,
                              max_cached_grants: int = 100_000) -> AsyncIterator[StoreApprovalBook]:
    """A store-backed book on its own channel, its watch started unless ``watch`` is False."""
    async with service_channel(target, "policy") as channel:
        book = StoreApprovalBook(channel, ttl_s=ttl_s, max_cached_grants=max_cached_grants)
        if watch:
            book.start()
        try:
            yield book
        finally:
            await book.close()


@contextlib.asynccontextmanager
async def policy_replica(target: str, *, audit_log: AuditLog | None = None) -> AsyncIterator[Replica]:
    """A PolicyService keeping approvals in the store at ``target`` (and its audit chain, unless ``audit_log``)."""
    async with (store_approval_book(target) as book, service_channel(target, "policy") as channel):
        log = audit_log if audit_log is not None else StoreAuditLog(channel)
        service = PolicyService(PolicyHolder(default_policy()), book, AuditChain(log, TEST_KEY))
        try:
            yield Replica(service, book, log)
        finally:
            service.close()
