"""AgentService: decode -> Orchestrator -> encode. Errors leave through the one interceptor."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.errors import Unavailable
from services.orchestrator import convert
from services.orchestrator.core.orchestrator import Orchestrator
from services.orchestrator.core.webhooks import WebhookRegistry


class AgentServicer(orchestrator_pb2_grpc.AgentServiceServicer):
    """Registered before the app starts; `bind` hands it the orchestrator once built."""

    def __init__(self) -> None:
        self._bound: Orchestrator | None = None
        self._webhooks_bound: WebhookRegistry | None = None

    def bind(self, orchestrator: Orchestrator, webhooks: WebhookRegistry | None = None) -> None:
        self._bound = orchestrator
        self._webhooks_bound = webhooks or WebhookRegistry(None)

    @property
    def _orch(self) -> Orchestrator:
        if self._bound is None:
            raise Unavailable("orchestrator is starting", reason="NOT_READY")
        return self._bound

    @property
    def _webhooks(self) -> WebhookRegistry:
        if self._webhooks_bound is None:
            raise Unavailable("orchestrator is starting", reason="NOT_READY")
        return self._webhooks_bound

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.CreateSessionResponse:
        session = await self._orch.sessions.create(
            request_id=request.request_id, tenant_id=request.tenant_id, title=request.title, model=request.model,
            system_prompt=request.system_prompt, tools=list(request.tools))
        return pb.CreateSessionResponse(session=convert.session_to_pb(session))

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.GetSessionResponse:
        session = await self._orch.get_session(request.tenant_id, request.session_id)
        return pb.GetSessionResponse(session=convert.session_to_pb(session))

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        sessions, token = await self._orch.sessions.list(request.tenant_id, request.page_size, request.page_token)
        return pb.ListSessionsResponse(sessions=[convert.session_to_pb(s) for s in sessions], next_page_token=token)

    async def Run(self, request: pb.RunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunResponse]:
        _run, events = await self._orch.run(request_id=request.request_id, tenant_id=request.tenant_id,
                                            session_id=request.session_id, user_message=request.user_message,
                                            **convert.run_options(request.options))
        async for event in events:
            yield pb.RunResponse(event=convert.event_to_pb(event))

    async def Resume(self, request: pb.ResumeRequest, context) -> AsyncIterator[pb.ResumeResponse]:
        events = await self._orch.resume(request.tenant_id, request.session_id, request.after_seq)
        async for event in events:
            yield pb.ResumeResponse(event=convert.event_to_pb(event))

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        cancelled = await self._orch.cancel(request.tenant_id, request.session_id, request.run_id,
                                            request_id=request.request_id)
        return pb.CancelResponse(cancelled=cancelled)

    async def SubmitApproval(self, request: pb.SubmitApprovalRequest, context) -> pb.SubmitApprovalResponse:
        accepted = await self._orch.submit_approval(
            request_id=request.request_id, tenant_id=request.tenant_id, session_id=request.session_id,
            approval_id=request.approval_id, decision=convert.approval_decision(request.decision),
            approver=request.approver)
        return pb.SubmitApprovalResponse(accepted=accepted)

    async def EnqueueTask(self, request: pb.EnqueueTaskRequest, context) -> pb.EnqueueTaskResponse:
        task = await self._orch.enqueue_task(request_id=request.request_id, tenant_id=request.tenant_id,
                                             session_id=request.session_id, user_message=request.user_message,
                                             options=convert.run_options(request.options))
        return pb.EnqueueTaskResponse(task=convert.task_to_pb(task))

    async def CancelTask(self, request: pb.CancelTaskRequest, context) -> pb.CancelTaskResponse:
        task, was_running = await self._orch.cancel_task(request.tenant_id, request.task_id, request.reason,
                                                         request_id=request.request_id)
        return pb.CancelTaskResponse(task=convert.task_to_pb(task), was_running=was_running)

    async def GetTask(self, request: pb.GetTaskRequest, context) -> pb.GetTaskResponse:
        return pb.GetTaskResponse(task=convert.task_to_pb(await self._orch.get_task(request.tenant_id,
                                                                                   request.task_id)))

    async def CreateWebhook(self, request: pb.CreateWebhookRequest, context) -> pb.CreateWebhookResponse:
        created = await self._webhooks.create(request_id=request.request_id, tenant_id=request.tenant_id,
                                              url=request.url, event_types=list(request.event_types),
                                              secret=request.secret)
        return pb.CreateWebhookResponse(webhook=convert.webhook_to_pb(created.webhook), secret=created.secret)

    async def ListWebhooks(self, request: pb.ListWebhooksRequest, context) -> pb.ListWebhooksResponse:
        webhooks, token = await self._webhooks.list_webhooks(request.tenant_id, request.page_size, request.page_token)
        return pb.ListWebhooksResponse(webhooks=[convert.webhook_to_pb(w) for w in webhooks], next_page_token=token)

    async def DeleteWebhook(self, request: pb.DeleteWebhookRequest, context) -> pb.DeleteWebhookResponse:
        return pb.DeleteWebhookResponse(num_dropped=await self._webhooks.delete(request.tenant_id,
                                                                                request.webhook_id))

    async def ListDeadDeliveries(self, request: pb.ListDeadDeliveriesRequest,
                                 context) -> pb.ListDeadDeliveriesResponse:
        deliveries, token = await self._webhooks.list_dead(request.tenant_id, request.page_size, request.page_token)
        return pb.ListDeadDeliveriesResponse(deliveries=[convert.dead_delivery_to_pb(d) for d in deliveries],
                                             next_page_token=token)

    async def ReplayDeliveries(self, request: pb.ReplayDeliveriesRequest, context) -> pb.ReplayDeliveriesResponse:
        return pb.ReplayDeliveriesResponse(num_replayed=await self._webhooks.replay(request.tenant_id,
                                                                                    list(request.delivery_ids)))
