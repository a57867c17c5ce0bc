"""Protobuf <-> domain records (the only place besides servicer.py touching store_pb2)."""
from __future__ import annotations

from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp
from llmesh.store.v1 import store_pb2

from services.store.core.models import (
    ApprovalRecord,
    AuditRecord,
    DeliveryRecord,
    EventRecord,
    LockResult,
    MessageRecord,
    NewEvent,
    NewMessage,
    SessionControlRecord,
    SessionRecord,
    TaskRecord,
    WebhookRecord,
)


def timestamp(ms: int) -> Timestamp | None:
    if not ms:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def session_pb(r: SessionRecord) -> store_pb2.Session:
    return store_pb2.Session(tenant_id=r.tenant_id, session_id=r.session_id, title=r.title,
                             metadata_json=r.metadata_json, create_time=timestamp(r.create_ms),
                             update_time=timestamp(r.update_ms))


def new_messages(messages) -> list[NewMessage]:
    return [NewMessage(m.role, m.content, m.metadata_json, m.num_tokens) for m in messages]


def message_pb(r: MessageRecord) -> store_pb2.Message:
    return store_pb2.Message(position=r.position, role=r.role, content=r.content, metadata_json=r.metadata_json,
                             num_tokens=r.num_tokens, create_time=timestamp(r.create_ms))


def new_events(events) -> list[NewEvent]:
    return [NewEvent(e.type, bytes(e.payload), e.idempotency_key, e.schema_version) for e in events]


def event_pb(r: EventRecord) -> store_pb2.Event:
    return store_pb2.Event(session_id=r.session_id, seq=r.seq, type=r.type, payload=r.payload,
                           idempotency_key=r.idempotency_key, schema_version=r.schema_version,
                           create_time=timestamp(r.create_ms))


def task_pb(r: TaskRecord) -> store_pb2.Task:
    # protoc's .pyi types enum fields as the enum class (no int constructor at runtime); the numbers match.
    state = cast(store_pb2.TaskState, int(r.state))
    return store_pb2.Task(
        task_id=r.task_id, tenant_id=r.tenant_id, queue=r.queue, priority=r.priority, payload_json=r.payload_json,
        state=state, attempts=r.attempts, max_attempts=r.max_attempts, worker_id=r.worker_id,
        lease_expire_time=timestamp(r.lease_expire_ms), run_after_time=timestamp(r.run_after_ms),
        result_json=r.result_json, last_error=r.last_error, create_time=timestamp(r.create_ms),
        lease_token=r.lease_token)


def lock_pb(r: LockResult) -> store_pb2.AcquireSessionLockResponse:
    return store_pb2.AcquireSessionLockResponse(acquired=r.acquired, holder_id=r.holder_id,
                                                lease_expire_time=timestamp(r.lease_expire_ms),
                                                fencing_token=r.fencing_token,
                                                next_event_seq=r.next_event_seq)


def audit_record(e: store_pb2.AuditEntry) -> AuditRecord:
    return AuditRecord(e.tenant_id, e.seq, e.prev_hash, e.entry_hash, e.payload_json)


def audit_pb(r: AuditRecord) -> store_pb2.AuditEntry:
    return store_pb2.AuditEntry(tenant_id=r.tenant_id, seq=r.seq, prev_hash=r.prev_hash, entry_hash=r.entry_hash,
                                payload_json=r.payload_json, create_time=timestamp(r.create_ms))


def approval_pb(r: ApprovalRecord) -> store_pb2.Approval:
    return store_pb2.Approval(
        tenant_id=r.tenant_id, session_id=r.session_id, approval_id=r.approval_id, subject_key=r.subject_key,
        state=r.state.value, approver=r.approver, create_time=timestamp(r.create_ms),
        expire_time=timestamp(r.expire_ms), decided_request_id=r.decided_request_id, audit_seq=r.audit_seq,
        change_seq=r.change_seq)


def control_pb(r: SessionControlRecord) -> store_pb2.SessionControl:
    return store_pb2.SessionControl(tenant_id=r.tenant_id, session_id=r.session_id, seq=r.seq, kind=r.kind,
                                    run_id=r.run_id, payload_json=r.payload_json,
                                    create_time=timestamp(r.create_ms))


def webhook_pb(r: WebhookRecord, *, with_secret: bool = False) -> store_pb2.Webhook:
    return store_pb2.Webhook(tenant_id=r.tenant_id, webhook_id=r.webhook_id, url=r.url, event_types=list(r.event_types),
                             secret=r.secret if with_secret else "", create_time=timestamp(r.create_ms))


def webhook_record(w: store_pb2.Webhook) -> WebhookRecord:
    return WebhookRecord(w.tenant_id, w.webhook_id, w.url, tuple(w.event_types), w.secret, 0, 0)


def delivery_pb(r: DeliveryRecord) -> store_pb2.Delivery:
    return store_pb2.Delivery(
        delivery_id=r.delivery_id, tenant_id=r.tenant_id, webhook_id=r.webhook_id, url=r.url,
        destination=r.destination, session_id=r.session_id, event_type=r.event_type, body=r.body,
        state=cast(store_pb2.DeliveryState, int(r.state)), attempts=r.attempts, max_attempts=r.max_attempts,
        next_attempt_time=timestamp(r.next_attempt_ms), last_error=r.last_error, last_status=r.last_status,
        create_time=timestamp(r.create_ms), delivered_time=timestamp(r.delivered_ms), claim_token=r.claim_token,
        secret=r.secret)
