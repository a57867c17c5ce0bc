"""Row -> domain record conversions."""
from __future__ import annotations

from services.store.adapters.tables import (
    ApprovalRow,
    ArchivedAuditRow,
    ArchivedEventRow,
    AuditRow,
    EventRow,
    MessageRow,
    SessionControlRow,
    SessionRow,
    TaskRow,
)
from services.store.core.models import (
    ApprovalRecord,
    ApprovalState,
    AuditRecord,
    EventRecord,
    MessageRecord,
    SessionControlRecord,
    SessionRecord,
    TaskRecord,
    TaskState,
)


def session_record(row: SessionRow) -> SessionRecord:
    return SessionRecord(row.tenant_id, row.session_id, row.title, row.metadata_json, row.create_ms, row.update_ms)


def message_record(row: MessageRow) -> MessageRecord:
    return MessageRecord(row.position, row.role, row.content, row.metadata_json, row.num_tokens, row.create_ms)


def event_record(row: EventRow | ArchivedEventRow) -> EventRecord:
    return EventRecord(row.session_id, row.seq, row.type, bytes(row.payload), row.idempotency_key or "",
                       row.schema_version, row.create_ms)


def task_record(row: TaskRow) -> TaskRecord:
    return TaskRecord(
        task_id=row.task_id, tenant_id=row.tenant_id, queue=row.queue, priority=row.priority,
        payload_json=row.payload_json, state=TaskState(row.state), attempts=row.attempts,
        max_attempts=row.max_attempts, worker_id=row.worker_id, lease_token=row.lease_token,
        lease_expire_ms=row.lease_expire_ms, run_after_ms=row.run_after_ms, result_json=row.result_json,
        last_error=row.last_error, create_ms=row.create_ms)


def audit_record(row: AuditRow | ArchivedAuditRow) -> AuditRecord:
    return AuditRecord(row.tenant_id, row.seq, row.prev_hash, row.entry_hash, row.payload_json, row.create_ms)


def approval_record(row: ApprovalRow) -> ApprovalRecord:
    return ApprovalRecord(
        tenant_id=row.tenant_id, session_id=row.session_id, approval_id=row.approval_id,
        subject_key=row.subject_key, state=ApprovalState(row.state), approver=row.approver, create_ms=row.create_ms,
        expire_ms=row.expire_ms, decided_request_id=row.decided_request_id, audit_seq=row.audit_seq,
        change_seq=row.change_seq)


def control_record(row: SessionControlRow) -> SessionControlRecord:
    return SessionControlRecord(tenant_id=row.tenant_id, session_id=row.session_id, seq=row.seq, kind=row.kind,
                                run_id=row.run_id, payload_json=row.payload_json, create_ms=row.create_ms)
