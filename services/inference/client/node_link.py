"""The live connection to one inference node: channels, health, load.

Health comes from a ``grpc.health.v1`` Watch stream, so a node that drains
or dies is noticed when it happens, not at the next probe; load comes from
polling GetLoad. Both run as tasks owned by the link and end with it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.clients import channel_options, make_channel
from services.common.identity import Identity
from services.inference.client.config import BalancerSettings
from services.inference.client.core.node_state import Health, LoadReport, NodeState

log = logging.getLogger("llmesh.balancer")

# A Watch that fails this way before its first reply will never work on this
# server; UNAVAILABLE and friends just mean the node is down right now.
WATCH_NOT_USABLE = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


def _control_options(settings: BalancerSettings) -> list[tuple[str, int | str]]:
    # gRPC's default reconnect backoff grows to two minutes; a revived node
    # must be seen again within about one health interval.
    backoff_ms = max(100, int(settings.health_interval_s * 1000))
    return [
        *channel_options(),
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.min_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]


class NodeLink:
    def __init__(self, address: str, settings: BalancerSettings, identity: Identity | None = None) -> None:
        self.address = address
        self.settings = settings
        self.state = NodeState(address, ewma_alpha=settings.ewma_alpha)
        options = _control_options(settings)
        # Requests are traced; the health stream and load polls are not, or
        # every trace store would fill with twice-a-second GetLoad spans.
        # Nodes are dialled by address (DNS gives pod IPs): their certificates carry the service's name.
        self._call_channel = make_channel(address, identity, options=options, server_name="inference")
        self._control_channel = make_channel(address, identity, traced=False, options=options,
                                             server_name="inference")
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._call_channel)
        self._control = inference_pb2_grpc.InferenceServiceStub(self._control_channel)
        self._health = health_pb2_grpc.HealthStub(self._control_channel)
        self.health_known = asyncio.Event()
        # "watch" (pushed by the node) or "check" (probed once per interval).
        self.health_mode = "watch"
        self.load_polled = asyncio.Event()
        # Set once the node's models were asked for (answered or not).
        self.models_listed = asyncio.Event()
        self._list_models = True
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_health(), name=f"health-{self.address}"),
            asyncio.create_task(self._poll_load(), name=f"load-{self.address}"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._call_channel.close()
        await self._control_channel.close()

    def _set_health(self, serving: bool) -> None:
        if serving != (self.state.health is Health.SERVING):
            log.info("node health changed", extra={"event": "node_health", "node": self.address, "serving": serving})
        self.state.set_health(serving)
        self.health_known.set()

    async def _watch_health(self) -> None:
        request = health_pb2.HealthCheckRequest(service=self.settings.health_service)
        while True:
            got_reply = False
            try:
                async for reply in self._health.Watch(request):
                    got_reply = True
                    self._set_health(reply.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError as err:
                if not got_reply and err.code() in WATCH_NOT_USABLE:
                    # The server cannot stream health (no Watch, or a broken
                    # one): a Check per health interval bounds detection instead.
                    log.warning("health Watch not usable; probing with Check",
                                extra={"event": "health_watch_unusable", "node": self.address,
                                       "code": err.code().name})
                    self.health_mode = "check"
                    await self._probe_health_forever(request)
                    return
            # The stream ended or broke: the node restarted, died or is
            # unreachable. Unhealthy until a new stream says otherwise.
            self._set_health(False)
            await asyncio.sleep(self.settings.health_interval_s)

    async def _probe_health_forever(self, request: health_pb2.HealthCheckRequest) -> None:
        # Two probes per interval, so a change is seen within one interval
        # even when a probe itself takes a while.
        period_s = self.settings.health_interval_s / 2
        while True:
            try:
                reply = await self._health.Check(request, timeout=period_s)
                self._set_health(reply.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError:
                self._set_health(False)
            await asyncio.sleep(period_s)

    async def _refresh_models(self) -> None:
        """Which model names the node serves (ListModels), for model-aware picks and routing."""
        try:
            reply = await self._control.ListModels(inference_pb2.ListModelsRequest(),
                                                   timeout=self.settings.load_interval_s * 2)
            self.state.models = {m.name: m.n_ctx for m in reply.models}
            self.models_listed.set()
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                # Such a node is offered any model name and answers for itself.
                self._list_models = False
                self.models_listed.set()
            # Otherwise (a slow or failed answer) the list is still unknown: the next poll asks
            # again, and start() keeps waiting rather than offering the node every model name.

    async def _poll_load(self) -> None:
        polls = 0
        while True:
            if self.state.health is Health.SERVING:
                if self._list_models and (self.state.models is None
                                          or polls % self.settings.models_refresh_polls == 0):
                    await self._refresh_models()
                polls += 1
                try:
                    reply = await self._control.GetLoad(inference_pb2.GetLoadRequest(),
                                                        timeout=self.settings.load_interval_s * 2)
                    self.state.set_load(LoadReport(queue_depth=reply.queue_depth, num_running=reply.num_running,
                                                   kv_usage=reply.kv_usage, num_sequences=reply.num_sequences))
                    summary = reply.prefix_summary
                    self.state.set_prefix_summary(summary.block_chars, summary.block_hashes)
                    self.state.node_id = reply.node_id
                    self.load_polled.set()
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                        # A node without GetLoad: our own in-flight count is the load.
                        log.warning("node has no GetLoad", extra={"event": "no_get_load", "node": self.address})
                        return
            await asyncio.sleep(self.settings.load_interval_s)
