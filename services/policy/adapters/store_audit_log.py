"""AuditLog over the store service's AppendAudit / GetAuditHead / ListAudit."""
from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

import grpc
from llmesh.store.v1 import store_pb2, store_pb2_grpc

from services.common.errors import Aborted, DomainError
from services.common.rpc_errors import domain_error_from_rpc
from services.policy.core.audit import AuditHead, AuditRecord

STORE_TIMEOUT_S = 10.0


class StoreAuditLog:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = store_pb2_grpc.StoreServiceStub(channel)

    async def head(self, tenant_id: str) -> AuditHead:
        try:
            reply = await self._stub.GetAuditHead(store_pb2.GetAuditHeadRequest(tenant_id=tenant_id),
                                                  timeout=STORE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc) from None
        return AuditHead(reply.seq, reply.entry_hash)

    async def append(self, records: Sequence[AuditRecord]) -> list[AuditRecord]:
        first, *more = [store_pb2.AuditEntry(tenant_id=r.tenant_id, seq=r.seq, prev_hash=r.prev_hash,
                                             entry_hash=r.entry_hash, payload_json=r.payload_json) for r in records]
        try:
            # Entry hashes are unique per entry, so a retried append is recognised.
            reply = await self._stub.AppendAudit(
                store_pb2.AppendAuditRequest(request_id=f"audit-{first.entry_hash}-{len(records)}", entry=first,
                                             more_entries=more),
                timeout=STORE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc) from None
        return [_record(entry) for entry in (reply.entry, *reply.more_entries)]

    async def list(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        found: list[AuditRecord] = []
        token = ""
        while len(found) < limit:
            request = store_pb2.ListAuditRequest(tenant_id=tenant_id, after_seq=after_seq,
                                                 page_size=limit - len(found), page_token=token)
            try:
                reply = await self._stub.ListAudit(request, timeout=STORE_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                raise _domain_error(exc) from None
            found.extend(_record(e) for e in reply.entries)
            token = reply.next_page_token
            if not token or not reply.entries:
                break
        return found[:limit]


def _record(entry: store_pb2.AuditEntry) -> AuditRecord:
    created = entry.create_time.ToDatetime(tzinfo=UTC) if entry.HasField("create_time") else None
    return AuditRecord(entry.tenant_id, entry.seq, entry.prev_hash, entry.entry_hash, entry.payload_json, created)


def _domain_error(exc: grpc.aio.AioRpcError) -> DomainError:
    """Aborted (the chain moved: the core retries from a fresh head); any other failure is UNAVAILABLE."""
    return domain_error_from_rpc(exc, service="audit store", passed_on=(Aborted,))
