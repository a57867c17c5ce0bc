"""Wiring of the exec-policy and audit service: servicer, resources, lifecycle."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import grpc
from llmesh.policy.v1 import policy_pb2_grpc

from services.common.clients import make_channel, service_identity
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.refusals import DenialCount
from services.policy.adapters.audit_key import load_audit_key
from services.policy.adapters.memory_audit_log import MemoryAuditLog
from services.policy.adapters.policy_file_watcher import PolicyFileWatcher
from services.policy.adapters.store_approvals import StoreApprovalBook
from services.policy.adapters.store_audit_log import StoreAuditLog
from services.policy.config import Settings
from services.policy.core.approvals import ApprovalBook, ApprovalPort
from services.policy.core.audit import AuditChain, AuditLog
from services.policy.core.policy_holder import PolicyHolder
from services.policy.core.policy_loader import PolicyLoadError, load_policy
from services.policy.core.policy_service import EvaluationLimits, PolicyService
from services.policy.servicer import APPROVALS_HELD, PolicyServicer

SERVICE_NAME = "llmesh.policy.v1.PolicyService"
DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.yaml")
log = logging.getLogger("llmesh.policy")


class _LateService:
    """Lets register() run before start() has built the core."""

    service: PolicyService | None = None

    def __getattr__(self, name: str) -> Any:
        if self.service is None:
            raise FailedPrecondition("policy service is not started", reason="NOT_STARTED")
        return getattr(self.service, name)


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings, audit_log: AuditLog | None = None) -> None:
        if settings.audit_backend not in ("store", "memory"):
            raise InvalidArgument("audit_backend: must be store or memory", field="audit_backend")
        if settings.evaluate_workers < 2 or settings.evaluate_budget_s <= 0 or settings.evaluate_timeout_s <= 0:
            raise InvalidArgument("evaluate_workers: at least 2; evaluate_budget_s and evaluate_timeout_s: above 0",
                                  field="evaluate_workers")
        self.settings = settings
        self._audit_log = audit_log
        self._late = _LateService()
        self._channel: grpc.aio.Channel | None = None
        self._store_approvals: StoreApprovalBook | None = None
        self.holder: PolicyHolder | None = None
        self.watcher: PolicyFileWatcher | None = None

    @property
    def service(self) -> PolicyService:
        assert self._late.service is not None, "start() first"
        return self._late.service

    def register(self, server: grpc.aio.Server) -> None:
        # _LateService forwards every attribute to the PolicyService once start() has built it.
        late = cast(PolicyService, self._late)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(late), server)

    async def start(self) -> None:
        settings = self.settings
        policy_path = Path(settings.policy_file) if settings.policy_file else DEFAULT_POLICY_FILE
        try:
            policy = load_policy(policy_path.read_text(), str(policy_path))
        except PolicyLoadError as exc:
            # At start there are no old rules to fall back on: refuse to serve.
            raise FailedPrecondition(f"policy_file: {exc}", reason="POLICY_INVALID", field="policy_file") from None
        self.holder = PolicyHolder(policy)
        if settings.policy_file:
            self.watcher = PolicyFileWatcher(policy_path, self.holder, settings.reload_interval_s)
            self.watcher.start()
        key_file = Path(settings.audit_key_file)
        if not key_file.is_absolute():
            key_file = settings.data_path / key_file
        key = load_audit_key(settings.audit_key_env, key_file)
        approvals: ApprovalPort
        if settings.audit_backend == "store":
            # One channel, as the policy service, for the audit chain and the approvals.
            self._channel = make_channel(settings.store_target, service_identity(settings, "policy"))
            self._store_approvals = StoreApprovalBook(self._channel, ttl_s=settings.approval_ttl_s,
                                                      max_cached_grants=settings.approval_cache_grants)
            self._store_approvals.start()
            approvals = self._store_approvals
        else:
            approvals = ApprovalBook(ttl_s=settings.approval_ttl_s, max_approvals=settings.max_pending_approvals)
        audit_log = self._audit_log
        if audit_log is None:
            audit_log = StoreAuditLog(self._channel) if self._channel is not None else MemoryAuditLog()
        APPROVALS_HELD.set_function(lambda: approvals.num_held)
        limits = EvaluationLimits(num_workers=settings.evaluate_workers, budget_s=settings.evaluate_budget_s,
                                  timeout_s=settings.evaluate_timeout_s)
        self._late.service = PolicyService(self.holder, approvals, AuditChain(audit_log, key), limits)
        log.info("policy loaded", extra={"event": "policy_loaded", "source": str(policy_path),
                                         "version": policy.version, "audit_backend": settings.audit_backend,
                                         "approvals": "store" if self._store_approvals is not None else "memory"})

    async def record_access_denials(self, batch: list[DenialCount]) -> None:
        """The policy service's own refusals go straight to its audit chains."""
        await self.service.record_access_denials([item.payload() for item in batch])

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self._late.service is not None:
            self._late.service.close()
        if self._store_approvals is not None:
            await self._store_approvals.close()
        if self._channel is not None:
            await self._channel.close()


def build_app(settings: Settings) -> App:
    return App(settings)
