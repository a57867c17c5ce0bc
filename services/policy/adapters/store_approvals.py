"""ApprovalPort over the store service: approvals shared by every policy replica.

Every change goes to the store, which makes it atomically (two replicas
racing to use one approve-once grant: one wins). Session-wide grants are also
cached here, fed by one WatchApprovals stream per replica, so a call a grant
covers is allowed without a round trip; a call the cache does not cover is
checked against the store before a new request is opened, so a grant recorded
through another replica a moment ago is honoured whatever the watch's delay.
A store that cannot be reached fails the call (UNAVAILABLE): nothing is
allowed on a guess.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from typing import Any

import grpc
from llmesh.store.v1 import store_pb2, store_pb2_grpc

from services.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.rpc_errors import domain_error_from_rpc
from services.policy.core.approvals import Approval, ApprovalState, Decided, not_found
from services.policy.core.grant_cache import SessionGrantCache

STORE_TIMEOUT_S = 10.0
# The longest wait for an answer the store accepts (30 days).
MAX_TTL_MS = 30 * 24 * 3600 * 1000
LIST_PAGE_SIZE = 200
# Reconnect delays of the watch: doubled after each failure, up to the cap, with jitter.
WATCH_BACKOFF_MIN_S = 0.1
WATCH_BACKOFF_MAX_S = 10.0
# Answers to a watch that mean its position is of no use: start again from the current end.
_WATCH_RESTART = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                            grpc.StatusCode.FAILED_PRECONDITION})

log = logging.getLogger("llmesh.policy")


class StoreApprovalBook:
    def __init__(self, channel: grpc.aio.Channel, *, ttl_s: float = 3600.0, max_cached_grants: int = 100_000,
                 cache_ttl_s: float = 3600.0) -> None:
        self._stub = store_pb2_grpc.StoreServiceStub(channel)
        self.ttl_ms = min(max(1, int(ttl_s * 1000)), MAX_TTL_MS)
        self.grants = SessionGrantCache(max_cached_grants, cache_ttl_s)
        #: Set while the watch is live (the store said so); cleared while it reconnects.
        self.watch_live = asyncio.Event()
        #: change_seq of the last change the watch delivered (or started after).
        self.watched_change_seq = 0
        self._watch: asyncio.Task[None] | None = None

    @property
    def num_held(self) -> int:
        return len(self.grants)

    def start(self) -> None:
        """Start following the store's approval changes (one stream, reconnected on failure)."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._follow(), name="policy-approval-watch")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def open(self, tenant_id: str, session_id: str, subject_key: str) -> Approval:
        reply = await self._call(self._stub.OpenApproval, store_pb2.OpenApprovalRequest(
            request_id=f"open-{uuid.uuid4().hex}", tenant_id=tenant_id, session_id=session_id,
            subject_key=subject_key, ttl_ms=self.ttl_ms))
        return self._seen(reply.approval)

    async def get(self, tenant_id: str, session_id: str, approval_id: str) -> Approval:
        try:
            reply = await self._call(self._stub.GetApproval, store_pb2.GetApprovalRequest(
                tenant_id=tenant_id, session_id=session_id, approval_id=approval_id))
        except NotFound:
            raise not_found(approval_id) from None
        return self._seen(reply.approval)

    async def session_allows(self, tenant_id: str, session_id: str, subject_key: str) -> bool:
        if self.grants.covers(tenant_id, session_id, subject_key):
            return True
        found, token = False, ""
        while True:
            reply = await self._call(self._stub.ListApprovals, store_pb2.ListApprovalsRequest(
                tenant_id=tenant_id, session_id=session_id, state=ApprovalState.APPROVED_SESSION.value,
                page_size=LIST_PAGE_SIZE, page_token=token))
            for stored in reply.approvals:
                approval = self._seen(stored)
                found = found or (approval.state is ApprovalState.APPROVED_SESSION
                                  and approval.subject_key == subject_key)
            token = reply.next_page_token
            if not token or not reply.approvals:
                return found

    async def decide(self, tenant_id: str, session_id: str, approval_id: str, from_state: ApprovalState,
                     to_state: ApprovalState, approver: str, request_id: str) -> Decided:
        try:
            reply = await self._call(self._stub.DecideApproval, store_pb2.DecideApprovalRequest(
                request_id=request_id, tenant_id=tenant_id, session_id=session_id, approval_id=approval_id,
                from_state=from_state.value, to_state=to_state.value, approver=approver))
        except NotFound:
            raise not_found(approval_id) from None
        return Decided(self._seen(reply.approval), replayed=reply.replayed)

    async def note_audit(self, tenant_id: str, session_id: str, approval_id: str, audit_seq: int) -> Approval:
        try:
            reply = await self._call(self._stub.NoteApprovalAudit, store_pb2.NoteApprovalAuditRequest(
                tenant_id=tenant_id, session_id=session_id, approval_id=approval_id, audit_seq=audit_seq))
        except NotFound:
            raise not_found(approval_id) from None
        return self._seen(reply.approval)

    def _seen(self, stored: store_pb2.Approval) -> Approval:
        """The store's approval as the core's; a session-wide grant also goes into the cache."""
        try:
            state = ApprovalState(stored.state)
        except ValueError:
            raise Unavailable(f"approval store: unknown approval state {stored.state!r}",
                              reason="APPROVAL_STORE_FAILED") from None
        approval = Approval(stored.approval_id, stored.tenant_id, stored.session_id, stored.subject_key, state,
                            stored.approver, stored.decided_request_id, stored.audit_seq)
        if state is ApprovalState.APPROVED_SESSION:
            self.grants.add(approval.tenant_id, approval.session_id, approval.subject_key, approval.approval_id)
        return approval

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=STORE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc) from None

    async def _follow(self) -> None:
        """Feed the grant cache from WatchApprovals, for as long as the service runs.

        Starts at the store's current end (grants from before are found when
        first asked for), then resumes after the last change seen.
        """
        from_now, delay_s = True, WATCH_BACKOFF_MIN_S
        while True:
            if from_now:
                self.watched_change_seq = 0  # the live marker says where the new start is
            call = self._stub.WatchApprovals(store_pb2.WatchApprovalsRequest(
                after_change_seq=0 if from_now else self.watched_change_seq, from_now=from_now))
            try:
                async for reply in call:
                    if reply.HasField("approval"):
                        self.watched_change_seq = max(self.watched_change_seq, reply.change_seq)
                        self._observe(reply.approval)
                    else:
                        # The live marker names the store's head: where a from_now watch starts. On a
                        # resumed watch the replay may still be on its way, so the cursor stays put.
                        if from_now:
                            self.watched_change_seq = reply.change_seq
                        from_now, delay_s = False, WATCH_BACKOFF_MIN_S
                        self.watch_live.set()
                log.info("approval watch ended by the store; reconnecting", extra={"event": "approval_watch_ended"})
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _WATCH_RESTART:
                    from_now = True
                log.warning("approval watch failed; reconnecting", extra={
                    "event": "approval_watch_failed", "code": exc.code().name, "detail": exc.details(),
                    "retry_in_s": round(delay_s, 3)})
            except Exception:
                log.exception("approval watch broke; reconnecting", extra={"event": "approval_watch_failed"})
            finally:
                self.watch_live.clear()
                call.cancel()
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))
            delay_s = min(delay_s * 2, WATCH_BACKOFF_MAX_S)

    def _observe(self, stored: store_pb2.Approval) -> None:
        try:
            self._seen(stored)
        except Unavailable:
            log.warning("approval watch delivered an approval in an unknown state",
                        extra={"event": "approval_watch_bad_state", "state": stored.state})


def _domain_error(exc: grpc.aio.AioRpcError) -> DomainError:
    """Refusals keep their meaning; any other failure makes the store UNAVAILABLE to the caller."""
    return domain_error_from_rpc(exc, service="approval store",
                                 passed_on=(NotFound, FailedPrecondition, InvalidArgument, ResourceExhausted))
