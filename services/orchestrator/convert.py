"""Domain records <-> llmesh.orchestrator.v1 messages (the only other *_pb2 user is the servicer)."""
from __future__ import annotations

from typing import cast

from google.protobuf import json_format, timestamp_pb2
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb

from services.orchestrator.core import events as ev
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.sessions import AgentSession
from services.orchestrator.core.tasks import TaskView
from services.orchestrator.core.webhooks import DeliveryRecord, WebhookRecord

_BODY_FIELD = {ev.TURN_STARTED: "turn_started", ev.TOKEN: "token", ev.TOOL_CALL: "tool_call",
               ev.APPROVAL_REQUIRED: "approval_required", ev.TOOL_RESULT: "tool_result",
               ev.COMPACTION: "compaction", ev.FINAL: "final", ev.ERROR: "error"}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def event_to_pb(event: AgentEvent) -> pb.AgentEvent:
    # Value() is typed as returning int; the field is typed as the enum class.
    event_type = cast(pb.EventType, pb.EventType.Value("EVENT_TYPE_" + event.type.upper()))
    msg = pb.AgentEvent(session_id=event.session_id, seq=event.seq, run_id=event.run_id, type=event_type,
                        create_time=timestamp(event.create_time), schema_version=event.schema_version)
    field = _BODY_FIELD[event.type]
    json_format.ParseDict(event.body, getattr(msg, field), ignore_unknown_fields=True)
    if not msg.HasField(field):
        getattr(msg, field).SetInParent()
    return msg


def session_to_pb(session: AgentSession) -> pb.Session:
    return pb.Session(session_id=session.session_id, tenant_id=session.tenant_id, title=session.title,
                      model=session.model, system_prompt=session.system_prompt, tools=list(session.tools),
                      create_time=timestamp(session.create_time), last_seq=session.last_seq)


_TASK_STATES = {"QUEUED": pb.TASK_STATE_QUEUED, "RUNNING": pb.TASK_STATE_RUNNING,
                "SUCCEEDED": pb.TASK_STATE_SUCCEEDED, "FAILED": pb.TASK_STATE_FAILED,
                "CANCELLED": pb.TASK_STATE_CANCELLED}


def task_to_pb(task: TaskView) -> pb.Task:
    return pb.Task(task_id=task.task_id, session_id=task.session_id, state=_TASK_STATES[task.state],
                   attempts=task.attempts, result_text=task.result_text, error=task.error,
                   create_time=timestamp(task.create_time))


def webhook_to_pb(webhook: WebhookRecord) -> pb.Webhook:
    """A subscription as clients see it: never its secret."""
    return pb.Webhook(webhook_id=webhook.webhook_id, url=webhook.url, event_types=list(webhook.event_types),
                      create_time=timestamp(webhook.create_time))


def dead_delivery_to_pb(delivery: DeliveryRecord) -> pb.DeadDelivery:
    return pb.DeadDelivery(delivery_id=delivery.delivery_id, webhook_id=delivery.webhook_id, url=delivery.url,
                           session_id=delivery.session_id, event_type=delivery.event_type,
                           attempts=delivery.attempts, last_error=delivery.last_error,
                           last_status=delivery.last_status, create_time=timestamp(delivery.create_time))


def run_options(options: pb.RunOptions) -> dict:
    """RunOptions as keyword arguments of RunManager.start (and a task's stored options)."""
    return {"max_steps": options.max_steps, "max_tokens": options.max_tokens, "temperature": options.temperature,
            "seed": options.seed if options.HasField("seed") else None, "priority": int(options.priority),
            "tool_choice": options.tool_choice}


def approval_decision(value: int) -> str:
    return pb.ApprovalDecision.Name(value) if value in pb.ApprovalDecision.values() else "APPROVAL_DECISION_UNSPECIFIED"
