"""Wiring of the agent orchestrator: ports, core, servicer, lifecycle.

Ports can be injected (tests, or a load-balancing inference client); those
not injected are gRPC clients to the targets in the settings. Without a
store_target the orchestrator keeps its state in memory, which suits one
process on a laptop and nothing else.
"""
from __future__ import annotations

import logging
from typing import Any

import grpc
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.clients import make_channel, service_identity
from services.common.errors import FailedPrecondition
from services.common.identity import Identity
from services.common.tenants import parse_tenant_policies
from services.orchestrator import metrics
from services.orchestrator.adapters.grpc_inference import GrpcInference
from services.orchestrator.adapters.grpc_policy import GrpcPolicy
from services.orchestrator.adapters.grpc_store import GrpcStore
from services.orchestrator.adapters.grpc_tools import GrpcTools
from services.orchestrator.adapters.grpc_webhooks import GrpcWebhooks, HttpxSender
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.config import Settings
from services.orchestrator.core.orchestrator import Orchestrator, OrchestratorConfig
from services.orchestrator.core.retry import RetryPolicy
from services.orchestrator.core.runs import RunLimits
from services.orchestrator.core.tasks import TaskClassLimits
from services.orchestrator.core.webhooks import DeliveryConfig, DeliveryWorker, WebhookRegistry
from services.orchestrator.servicer import AgentServicer

SERVICE_NAME = "llmesh.orchestrator.v1.AgentService"

log = logging.getLogger("llmesh.orchestrator")


def orchestrator_config(settings: Settings) -> OrchestratorConfig:
    return OrchestratorConfig(
        limits=RunLimits(default_max_steps=settings.default_max_steps, default_max_tokens=settings.default_max_tokens,
                         context_fraction=settings.context_fraction, max_active_runs=settings.max_active_runs,
                         lock_lease_ms=settings.session_lock_lease_ms),
        retry=RetryPolicy(max_attempts=settings.retry_attempts, base_delay_s=settings.retry_base_ms / 1000.0),
        tenant_runs_per_s=settings.tenant_runs_per_s, tenant_burst=settings.tenant_burst,
        model_runs_per_s=settings.model_runs_per_s, model_burst=settings.model_burst,
        event_batch_interval_s=settings.event_batch_ms / 1000.0, event_batch_max=settings.event_batch_max,
        approval_timeout_s=settings.approval_timeout_s, max_workers=settings.max_workers,
        task_lease_ms=settings.task_lease_ms, task_idle_wait_s=settings.task_idle_wait_ms / 1000.0,
        task_max_attempts=settings.task_max_attempts, replica_id=settings.replica_id,
        task_class_limits=TaskClassLimits(
            max_running={"interactive": settings.task_max_running_interactive,
                         "normal": settings.task_max_running_normal, "batch": settings.task_max_running_batch},
            batch_reserved_workers=settings.task_batch_reserved_workers,
            max_wait_s={"normal": settings.task_max_wait_ms_normal / 1000.0,
                        "batch": settings.task_max_wait_ms_batch / 1000.0}),
        tenant_policies=parse_tenant_policies(settings.tenant_policies))


def delivery_config(settings: Settings) -> DeliveryConfig:
    return DeliveryConfig(
        workers=settings.webhook_workers, lease_ms=settings.webhook_lease_ms,
        max_per_destination=settings.webhook_max_per_destination, timeout_s=settings.webhook_timeout_s,
        backoff_base_ms=settings.webhook_backoff_base_ms, backoff_max_ms=settings.webhook_backoff_max_ms,
        idle_wait_s=settings.webhook_idle_wait_s, stats_interval_s=settings.webhook_stats_interval_s,
        allow_private=settings.webhook_allow_private)


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings, *, store: Any = None, inference: Any = None, tools: Any = None,
                 policy: Any = None, webhooks: Any = None, webhook_sender: Any = None) -> None:
        self.settings = settings
        self._ports = {"store": store, "inference": inference, "tools": tools, "policy": policy,
                       "webhooks": webhooks, "webhook_sender": webhook_sender}
        self._channels: list[grpc.aio.Channel] = []
        self.servicer = AgentServicer()
        self.orchestrator: Orchestrator | None = None
        self._balancer: Any = None
        self._identity: Identity | None = None
        self.webhooks: WebhookRegistry | None = None
        self.deliveries: DeliveryWorker | None = None

    @property
    def identity(self) -> Identity:
        """The orchestrator's own credentials, made on first use (in start, not at build time)."""
        if self._identity is None:
            self._identity = service_identity(self.settings, "orchestrator")
        return self._identity

    def register(self, server: grpc.aio.Server) -> None:
        orchestrator_pb2_grpc.add_AgentServiceServicer_to_server(self.servicer, server)

    def _channel(self, name: str, target: str) -> grpc.aio.Channel:
        if not target:
            raise FailedPrecondition(f"{name}_target is not set", reason="MISSING_TARGET", field=f"{name}_target")
        channel = make_channel(target, self.identity)
        self._channels.append(channel)
        return channel

    async def start(self) -> None:
        s = self.settings
        config = delivery_config(s)  # checked before anything starts
        store_channel = self._channel("store", s.store_target) if s.store_target else None
        store = self._ports["store"]
        if store is None:
            if store_channel is not None:
                store = GrpcStore.for_channel(store_channel)
            else:
                log.warning("no store_target: sessions, events and tasks live in this process only")
                store = MemoryStore()
        webhook_store = self._ports["webhooks"]
        if webhook_store is None and store_channel is not None:
            webhook_store = GrpcWebhooks.for_channel(store_channel)
        inference = self._ports["inference"] or await self._inference_client()
        tools = self._ports["tools"] or GrpcTools.for_channel(self._channel("tools", s.tools_target),
                                                                role=s.tool_role)
        policy = self._ports["policy"] or GrpcPolicy.for_channel(self._channel("policy", s.policy_target))
        self.orchestrator = Orchestrator(store=store, inference=inference, tools=tools, policy=policy,
                                         config=orchestrator_config(s), signals=metrics.signals())
        self.orchestrator.hub.add_observer(metrics.observe_event)
        metrics.watch_tasks(self.orchestrator.tasks)
        self.orchestrator.start()
        if not await self.orchestrator.wait_ready():
            log.warning("session control watch not live yet: Cancel and SubmitApproval from other replicas "
                        "reach runs here once it is")
        self.webhooks = WebhookRegistry(webhook_store, allow_private=s.webhook_allow_private)
        if webhook_store is not None and config.workers > 0:
            self.deliveries = DeliveryWorker(webhook_store, self._ports["webhook_sender"] or HttpxSender(),
                                             worker_id=self.orchestrator.replica_id, config=config,
                                             signals=metrics.webhook_signals())
            self.deliveries.start()
        elif webhook_store is None:
            log.info("no store_target: webhooks are off (their RPCs answer FAILED_PRECONDITION)")
        self.servicer.bind(self.orchestrator, self.webhooks)

    @property
    def inference_balancer(self) -> Any:
        """The client-side balancer when `inference_nodes` is set (its view of the nodes), else None."""
        return self._balancer

    async def _inference_client(self) -> GrpcInference:
        nodes = [n.strip() for n in self.settings.inference_nodes.split(",") if n.strip()]
        if not nodes:
            return GrpcInference.for_channel(self._channel("inference", self.settings.inference_target))
        from services.inference.client import Balancer, load_balancer_settings

        self._balancer = Balancer(nodes, load_balancer_settings(), identity=self.identity)
        await self._balancer.start()
        return GrpcInference(self._balancer)

    async def close(self) -> None:
        if self.deliveries is not None:
            await self.deliveries.close()
            if self._ports["webhook_sender"] is None:
                await self.deliveries.sender.aclose()
            self.deliveries = None
        if self.orchestrator is not None:
            await self.orchestrator.close()
        if self._balancer is not None:
            await self._balancer.close()
        for channel in self._channels:
            await channel.close()
        self._channels.clear()


def build_app(settings: Settings, **ports: Any) -> App:
    return App(settings, **ports)
