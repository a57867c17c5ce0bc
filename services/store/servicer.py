"""StoreService servicer: decode -> StoreCore -> encode. No logic lives here."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import grpc
from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from services.common.auth import principal_var
from services.common.errors import require
from services.store import convert
from services.store.core.models import DeliveryState, NewSession
from services.store.core.store import StoreCore


def _acting_for_client() -> str | None:
    """The tenant of the client this call acts for; None for a mesh service acting for itself
    (or a store run without authentication, where every caller is trusted alike)."""
    principal = principal_var.get()
    return principal.tenant_id if principal is not None and not principal.is_service else None


class StoreServicer(store_pb2_grpc.StoreServiceServicer):
    def __init__(self, core: StoreCore) -> None:
        self._core = core

    @property
    def core(self) -> StoreCore:
        return self._core

    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext):
        record, _ = await self.core.create_session(NewSession(
            request.tenant_id, request.session_id, request.title, request.metadata_json, request.request_id))
        return pb.CreateSessionResponse(session=convert.session_pb(record))

    async def GetSession(self, request: pb.GetSessionRequest, context):
        record = await self.core.get_session(request.tenant_id, request.session_id)
        return pb.GetSessionResponse(session=convert.session_pb(record))

    async def ListSessions(self, request: pb.ListSessionsRequest, context):
        page = await self.core.list_sessions(request.tenant_id, request.page_size, request.page_token)
        return pb.ListSessionsResponse(sessions=[convert.session_pb(r) for r in page.items],
                                       next_page_token=page.next_page_token)

    async def AppendMessages(self, request: pb.AppendMessagesRequest, context):
        positions = await self.core.append_messages(request.tenant_id, request.session_id,
                                                    convert.new_messages(request.messages), request.request_id,
                                                    request.fencing_token)
        return pb.AppendMessagesResponse(positions=positions)

    async def ListMessages(self, request: pb.ListMessagesRequest, context):
        page = await self.core.list_messages(request.tenant_id, request.session_id, request.after_position,
                                             request.page_size, request.page_token)
        return pb.ListMessagesResponse(messages=[convert.message_pb(r) for r in page.items],
                                       next_page_token=page.next_page_token)

    async def AppendEvents(self, request: pb.AppendEventsRequest, context):
        seqs = await self.core.append_events(request.tenant_id, request.session_id,
                                             convert.new_events(request.events), request.request_id,
                                             no_drop=request.no_drop, fencing_token=request.fencing_token)
        return pb.AppendEventsResponse(seqs=seqs, num_dropped=sum(1 for s in seqs if s == 0))

    async def ReadEvents(self, request: pb.ReadEventsRequest, context):
        page = await self.core.read_events(request.tenant_id, request.session_id, request.after_seq,
                                           request.page_size, request.page_token)
        return pb.ReadEventsResponse(events=[convert.event_pb(r) for r in page.items],
                                     next_page_token=page.next_page_token)

    async def WatchEvents(self, request: pb.WatchEventsRequest, context) -> AsyncIterator[pb.WatchEventsResponse]:
        async for record in self.core.watch_events(request.tenant_id, request.session_id, request.after_seq):
            yield pb.WatchEventsResponse(event=convert.event_pb(record))

    async def EnqueueTask(self, request: pb.EnqueueTaskRequest, context):
        task, created = await self.core.enqueue_task(
            request.tenant_id, request.queue, request.priority, request.payload_json, request.idempotency_key,
            request.max_attempts, request.request_id)
        return pb.EnqueueTaskResponse(task=convert.task_pb(task), created=created)

    async def ClaimTasks(self, request: pb.ClaimTasksRequest, context):
        tasks = await self.core.claim_tasks(request.queue, request.worker_id, request.max_tasks, request.lease_ms,
                                            request.request_id)
        return pb.ClaimTasksResponse(tasks=[convert.task_pb(t) for t in tasks])

    async def HeartbeatTask(self, request: pb.HeartbeatTaskRequest, context):
        task = await self.core.heartbeat_task(request.task_id, request.lease_token, request.lease_ms)
        return pb.HeartbeatTaskResponse(task=convert.task_pb(task))

    async def AckTask(self, request: pb.AckTaskRequest, context):
        task = await self.core.ack_task(request.task_id, request.lease_token, request.result_json)
        return pb.AckTaskResponse(task=convert.task_pb(task))

    async def FailTask(self, request: pb.FailTaskRequest, context):
        task = await self.core.fail_task(request.task_id, request.lease_token, request.error, request.permanent)
        return pb.FailTaskResponse(task=convert.task_pb(task))

    async def GetTask(self, request: pb.GetTaskRequest, context):
        return pb.GetTaskResponse(task=convert.task_pb(await self.core.get_task(request.tenant_id, request.task_id)))

    async def CancelTask(self, request: pb.CancelTaskRequest, context):
        record, previous = await self.core.cancel_task(request.tenant_id, request.task_id, request.reason)
        return pb.CancelTaskResponse(task=convert.task_pb(record), previous_state=cast(pb.TaskState, int(previous)))

    # -- webhooks ----------------------------------------------------------------

    async def CreateWebhook(self, request: pb.CreateWebhookRequest, context):
        record = await self.core.webhooks.create(convert.webhook_record(request.webhook))
        # The secret goes back to its creator (a retried create learns the stored one), never in listings.
        return pb.CreateWebhookResponse(webhook=convert.webhook_pb(record, with_secret=True))

    async def ListWebhooks(self, request: pb.ListWebhooksRequest, context):
        page = await self.core.webhooks.list_webhooks(request.tenant_id, request.page_size, request.page_token)
        return pb.ListWebhooksResponse(webhooks=[convert.webhook_pb(r) for r in page.items],
                                       next_page_token=page.next_page_token)

    async def DeleteWebhook(self, request: pb.DeleteWebhookRequest, context):
        return pb.DeleteWebhookResponse(num_dropped=await self.core.webhooks.delete(request.tenant_id,
                                                                                   request.webhook_id))

    async def ClaimDeliveries(self, request: pb.ClaimDeliveriesRequest, context):
        claimed = await self.core.webhooks.claim(request.worker_id, request.max_deliveries, request.lease_ms,
                                                 list(request.exclude_destinations), request.max_per_destination)
        return pb.ClaimDeliveriesResponse(deliveries=[convert.delivery_pb(d) for d in claimed])

    async def FinishDelivery(self, request: pb.FinishDeliveryRequest, context):
        require(request.outcome in (pb.DELIVERY_OUTCOME_DELIVERED, pb.DELIVERY_OUTCOME_RETRY), "outcome",
                "must be DELIVERED or RETRY")
        record = await self.core.webhooks.finish(
            request.delivery_id, request.claim_token, request.outcome == pb.DELIVERY_OUTCOME_DELIVERED,
            request.error, request.http_status, request.retry_after_ms)
        return pb.FinishDeliveryResponse(delivery=convert.delivery_pb(record))

    async def ListDeliveries(self, request: pb.ListDeliveriesRequest, context):
        require(int(request.state) in {int(s) for s in DeliveryState}, "state",
                "must be PENDING, CLAIMED, DELIVERED or DEAD")
        page = await self.core.webhooks.list_deliveries(request.tenant_id, DeliveryState(int(request.state)),
                                                        request.page_size, request.page_token)
        return pb.ListDeliveriesResponse(deliveries=[convert.delivery_pb(d) for d in page.items],
                                         next_page_token=page.next_page_token)

    async def ReplayDeliveries(self, request: pb.ReplayDeliveriesRequest, context):
        return pb.ReplayDeliveriesResponse(num_replayed=await self.core.webhooks.replay(
            request.tenant_id, list(request.delivery_ids)))

    async def GetOutboxStats(self, request: pb.GetOutboxStatsRequest, context):
        return pb.GetOutboxStatsResponse(destinations=[
            pb.DestinationStats(destination=d, pending=n, oldest_pending_age_s=age, dead=dead)
            for d, n, age, dead in await self.core.webhooks.stats()])

    async def AcquireSessionLock(self, request: pb.AcquireSessionLockRequest, context):
        result = await self.core.acquire_session_lock(request.tenant_id, request.session_id, request.owner_id,
                                                      request.lease_ms)
        return convert.lock_pb(result)

    async def ReleaseSessionLock(self, request: pb.ReleaseSessionLockRequest, context):
        released = await self.core.release_session_lock(request.tenant_id, request.session_id, request.owner_id)
        return pb.ReleaseSessionLockResponse(released=released)

    async def AppendAudit(self, request: pb.AppendAuditRequest, context):
        first, *more = await self.core.append_audit(
            [convert.audit_record(e) for e in (request.entry, *request.more_entries)])
        return pb.AppendAuditResponse(entry=convert.audit_pb(first), more_entries=[convert.audit_pb(e) for e in more])

    async def GetAuditHead(self, request: pb.GetAuditHeadRequest, context):
        seq, entry_hash = await self.core.get_audit_head(request.tenant_id)
        return pb.GetAuditHeadResponse(seq=seq, entry_hash=entry_hash)

    async def ListAudit(self, request: pb.ListAuditRequest, context):
        page = await self.core.list_audit(request.tenant_id, request.after_seq, request.page_size,
                                          request.page_token)
        return pb.ListAuditResponse(entries=[convert.audit_pb(r) for r in page.items],
                                    next_page_token=page.next_page_token)

    async def OpenApproval(self, request: pb.OpenApprovalRequest, context):
        record, created = await self.core.approvals.open(request.tenant_id, request.session_id,
                                                         request.subject_key, request.ttl_ms, request.request_id)
        return pb.OpenApprovalResponse(approval=convert.approval_pb(record), created=created)

    async def GetApproval(self, request: pb.GetApprovalRequest, context):
        record = await self.core.approvals.get(request.tenant_id, request.session_id, request.approval_id)
        return pb.GetApprovalResponse(approval=convert.approval_pb(record))

    async def DecideApproval(self, request: pb.DecideApprovalRequest, context):
        record, replayed = await self.core.approvals.decide(
            request.request_id, request.tenant_id, request.session_id, request.approval_id, request.from_state,
            request.to_state, request.approver)
        return pb.DecideApprovalResponse(approval=convert.approval_pb(record), replayed=replayed)

    async def NoteApprovalAudit(self, request: pb.NoteApprovalAuditRequest, context):
        record = await self.core.approvals.note_audit(request.tenant_id, request.session_id, request.approval_id,
                                                      request.audit_seq)
        return pb.NoteApprovalAuditResponse(approval=convert.approval_pb(record))

    async def ListApprovals(self, request: pb.ListApprovalsRequest, context):
        page = await self.core.approvals.list(request.tenant_id, request.session_id, request.state,
                                              request.page_size, request.page_token)
        return pb.ListApprovalsResponse(approvals=[convert.approval_pb(r) for r in page.items],
                                        next_page_token=page.next_page_token)

    async def WatchApprovals(self, request: pb.WatchApprovalsRequest,
                             context) -> AsyncIterator[pb.WatchApprovalsResponse]:
        async for record, change_seq in self.core.approvals.watch(
                request.after_change_seq, request.from_now, all_tenants_allowed=_acting_for_client() is None):
            yield pb.WatchApprovalsResponse(approval=convert.approval_pb(record) if record is not None else None,
                                            change_seq=change_seq)

    async def PostSessionControl(self, request: pb.PostSessionControlRequest, context):
        control = request.control
        record = await self.core.controls.post(
            request.request_id, control.tenant_id, control.session_id, control.kind, control.run_id,
            control.payload_json, seq=control.seq,
            create_time_set=control.HasField("create_time"),
            caller_tenant=_acting_for_client())
        return pb.PostSessionControlResponse(control=convert.control_pb(record))

    async def WatchSessionControls(self, request: pb.WatchSessionControlsRequest,
                                   context) -> AsyncIterator[pb.WatchSessionControlsResponse]:
        async for record, seq in self.core.controls.watch(
                request.after_seq, request.from_now, request.tenant_id, request.session_id,
                all_tenants_allowed=_acting_for_client() is None):
            yield pb.WatchSessionControlsResponse(
                control=convert.control_pb(record) if record is not None else None, seq=seq)
