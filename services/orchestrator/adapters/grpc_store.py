"""StorePort over llmesh.store.v1."""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
from llmesh.store.v1 import store_pb2, store_pb2_grpc

from services.common.paging import every_page
from services.common.rpc_errors import domain_error_from_rpc, domain_errors
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.ports import (
    ControlsLive,
    MessageRecord,
    SessionControl,
    SessionLockGrant,
    SessionRecord,
    TaskRecord,
)

PAGE_SIZE = 500


def _time(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def _session(msg: store_pb2.Session) -> SessionRecord:
    return SessionRecord(tenant_id=msg.tenant_id, session_id=msg.session_id, title=msg.title,
                         metadata=json.loads(msg.metadata_json or "{}"), create_time=_time(msg.create_time))


def _message(msg: store_pb2.Message) -> MessageRecord:
    return MessageRecord(role=msg.role, content=msg.content, metadata=json.loads(msg.metadata_json or "{}"),
                         num_tokens=msg.num_tokens, position=msg.position)


def _event(msg: store_pb2.Event) -> AgentEvent:
    return AgentEvent.from_payload(msg.session_id, msg.seq, msg.type, msg.payload, msg.schema_version or 1)


def _task(msg: store_pb2.Task) -> TaskRecord:
    return TaskRecord(task_id=msg.task_id, tenant_id=msg.tenant_id, payload_json=msg.payload_json,
                      state=store_pb2.TaskState.Name(msg.state).removeprefix("TASK_STATE_"), attempts=msg.attempts,
                      lease_token=msg.lease_token, worker_id=msg.worker_id, result_json=msg.result_json,
                      last_error=msg.last_error, create_time=_time(msg.create_time))


def _control(msg: store_pb2.SessionControl) -> SessionControl:
    return SessionControl(tenant_id=msg.tenant_id, session_id=msg.session_id, kind=msg.kind, run_id=msg.run_id,
                          payload=json.loads(msg.payload_json or "{}"), seq=msg.seq,
                          create_time=_time(msg.create_time))


class GrpcStore:
    def __init__(self, client) -> None:
        self._c = client

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel) -> GrpcStore:
        return cls(store_pb2_grpc.StoreServiceStub(channel))

    async def create_session(self, *, request_id, tenant_id, title, metadata) -> SessionRecord:
        with domain_errors("store"):
            reply = await self._c.CreateSession(store_pb2.CreateSessionRequest(
                request_id=request_id, tenant_id=tenant_id, title=title, metadata_json=json.dumps(metadata)))
        return _session(reply.session)

    async def get_session(self, *, tenant_id, session_id) -> SessionRecord:
        with domain_errors("store"):
            reply = await self._c.GetSession(store_pb2.GetSessionRequest(tenant_id=tenant_id, session_id=session_id))
        return _session(reply.session)

    async def list_sessions(self, *, tenant_id, page_size, page_token) -> tuple[list[SessionRecord], str]:
        with domain_errors("store"):
            reply = await self._c.ListSessions(store_pb2.ListSessionsRequest(
                tenant_id=tenant_id, page_size=page_size, page_token=page_token))
        return [_session(s) for s in reply.sessions], reply.next_page_token

    async def append_messages(self, *, request_id, tenant_id, session_id, messages, fencing_token=0) -> list[int]:
        with domain_errors("store"):
            reply = await self._c.AppendMessages(store_pb2.AppendMessagesRequest(
                request_id=request_id, tenant_id=tenant_id, session_id=session_id, fencing_token=fencing_token,
                messages=[store_pb2.Message(role=m.role, content=m.content, metadata_json=json.dumps(m.metadata),
                                            num_tokens=m.num_tokens) for m in messages]))
        return list(reply.positions)

    async def list_messages(self, *, tenant_id, session_id, after_position) -> list[MessageRecord]:
        with domain_errors("store"):
            return await every_page(
                lambda token: self._c.ListMessages(store_pb2.ListMessagesRequest(
                    tenant_id=tenant_id, session_id=session_id, after_position=after_position,
                    page_size=PAGE_SIZE, page_token=token)),
                lambda reply: map(_message, reply.messages))

    async def append_events(self, *, request_id, tenant_id, session_id, events: Sequence[AgentEvent],
                            idempotency_keys: Sequence[str], fencing_token: int = 0) -> list[int]:
        with domain_errors("store"):
            reply = await self._c.AppendEvents(store_pb2.AppendEventsRequest(
                request_id=request_id, tenant_id=tenant_id, session_id=session_id, fencing_token=fencing_token,
                # Live readers already saw these seqs: a dropped delta would leave a gap.
                no_drop=True,
                events=[store_pb2.Event(session_id=session_id, type=e.type, payload=e.payload_json().encode(),
                                        idempotency_key=key, schema_version=e.schema_version)
                        for e, key in zip(events, idempotency_keys, strict=True)]))
        return list(reply.seqs)

    async def read_events(self, *, tenant_id, session_id, after_seq) -> list[AgentEvent]:
        with domain_errors("store"):
            return await every_page(
                lambda token: self._c.ReadEvents(store_pb2.ReadEventsRequest(
                    tenant_id=tenant_id, session_id=session_id, after_seq=after_seq, page_size=PAGE_SIZE,
                    page_token=token)),
                lambda reply: map(_event, reply.events))

    async def watch_events(self, *, tenant_id, session_id, after_seq) -> AsyncIterator[AgentEvent]:
        call = self._c.WatchEvents(store_pb2.WatchEventsRequest(tenant_id=tenant_id, session_id=session_id,
                                                                after_seq=after_seq))
        try:
            async for reply in call:
                yield _event(reply.event)
        except grpc.RpcError as err:
            raise domain_error_from_rpc(err, service="store") from None
        finally:
            call.cancel()

    async def enqueue_task(self, *, request_id, tenant_id, queue, payload_json, idempotency_key,
                           max_attempts, priority=0) -> TaskRecord:
        with domain_errors("store"):
            reply = await self._c.EnqueueTask(store_pb2.EnqueueTaskRequest(
                request_id=request_id, tenant_id=tenant_id, queue=queue, payload_json=payload_json,
                idempotency_key=idempotency_key, max_attempts=max_attempts, priority=priority))
        return _task(reply.task)

    async def claim_tasks(self, *, queue, worker_id, max_tasks, lease_ms) -> list[TaskRecord]:
        with domain_errors("store"):
            reply = await self._c.ClaimTasks(store_pb2.ClaimTasksRequest(
                request_id=uuid.uuid4().hex, queue=queue, worker_id=worker_id, max_tasks=max_tasks,
                lease_ms=lease_ms))
        return [_task(t) for t in reply.tasks]

    async def heartbeat_task(self, *, task_id, lease_token, lease_ms) -> None:
        with domain_errors("store"):
            await self._c.HeartbeatTask(store_pb2.HeartbeatTaskRequest(request_id=uuid.uuid4().hex, task_id=task_id,
                                                                       lease_token=lease_token, lease_ms=lease_ms))

    async def ack_task(self, *, task_id, lease_token, result_json) -> None:
        with domain_errors("store"):
            await self._c.AckTask(store_pb2.AckTaskRequest(request_id=f"{task_id}:{lease_token}:ack",
                                                           task_id=task_id, lease_token=lease_token,
                                                           result_json=result_json))

    async def fail_task(self, *, task_id, lease_token, error, permanent) -> None:
        with domain_errors("store"):
            await self._c.FailTask(store_pb2.FailTaskRequest(request_id=f"{task_id}:{lease_token}:fail",
                                                             task_id=task_id, lease_token=lease_token, error=error,
                                                             permanent=permanent))

    async def get_task(self, *, tenant_id, task_id) -> TaskRecord:
        with domain_errors("store"):
            reply = await self._c.GetTask(store_pb2.GetTaskRequest(tenant_id=tenant_id, task_id=task_id))
        return _task(reply.task)

    async def cancel_task(self, *, tenant_id, task_id, reason) -> tuple[TaskRecord, str]:
        with domain_errors("store"):
            reply = await self._c.CancelTask(store_pb2.CancelTaskRequest(
                request_id=f"{task_id}:cancel", tenant_id=tenant_id, task_id=task_id, reason=reason))
        return _task(reply.task), store_pb2.TaskState.Name(reply.previous_state).removeprefix("TASK_STATE_")

    async def acquire_session_lock(self, *, tenant_id, session_id, owner_id, lease_ms) -> SessionLockGrant:
        with domain_errors("store"):
            reply = await self._c.AcquireSessionLock(store_pb2.AcquireSessionLockRequest(
                request_id=uuid.uuid4().hex, tenant_id=tenant_id, session_id=session_id, owner_id=owner_id,
                lease_ms=lease_ms))
        return SessionLockGrant(acquired=reply.acquired, next_event_seq=reply.next_event_seq,
                                fencing_token=reply.fencing_token, holder_id=reply.holder_id)

    async def release_session_lock(self, *, tenant_id, session_id, owner_id) -> bool:
        with domain_errors("store"):
            reply = await self._c.ReleaseSessionLock(store_pb2.ReleaseSessionLockRequest(
                request_id=f"{owner_id}-unlock", tenant_id=tenant_id, session_id=session_id, owner_id=owner_id))
        return reply.released

    async def post_session_control(self, *, request_id, control: SessionControl) -> SessionControl:
        with domain_errors("store"):
            reply = await self._c.PostSessionControl(store_pb2.PostSessionControlRequest(
                request_id=request_id, control=store_pb2.SessionControl(
                    tenant_id=control.tenant_id, session_id=control.session_id, kind=control.kind,
                    run_id=control.run_id, payload_json=json.dumps(control.payload, sort_keys=True))))
        return _control(reply.control)

    async def watch_session_controls(self, *, after_seq=0, from_now=False, tenant_id="",
                                     session_id="") -> AsyncIterator[SessionControl | ControlsLive]:
        call = self._c.WatchSessionControls(store_pb2.WatchSessionControlsRequest(
            after_seq=after_seq, from_now=from_now, tenant_id=tenant_id, session_id=session_id))
        try:
            async for reply in call:
                if reply.HasField("control"):
                    yield _control(reply.control)
                else:
                    yield ControlsLive(seq=reply.seq)
        except grpc.RpcError as err:
            raise domain_error_from_rpc(err, service="store") from None
        finally:
            call.cancel()
