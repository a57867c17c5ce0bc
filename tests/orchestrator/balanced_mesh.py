"""An orchestrator reaching two synthetic inference nodes through the client-side balancer.

Shared by the failover test and `bench/orchestrator.py --failover-only`:
nodes are real inference services (synthetic backend) on port 0; the
orchestrator gets them through `inference_nodes`, as in production, with the
in-memory store and fake tools and policy.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.runtime import RunningService, running_service, start_service
from services.inference.config import Settings as InferenceSettings
from services.inference.server import build_app as build_inference
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.config import Settings
from services.orchestrator.server import build_app
from tests.orchestrator.fakes import FakePolicy, FakeTools
from tests.support.auth import service_channel


@dataclass
class BalancedMesh:
    stub: orchestrator_pb2_grpc.AgentServiceStub
    nodes: dict[str, RunningService]  # address -> running node
    balancer: Any

    async def kill_node_of(self, session_id: str) -> str:
        """Stops the node the session sticks to (no grace) and returns its address."""
        address = self.balancer.holder_of(session_id)
        await self.nodes[address].stop(0)
        return address


@contextlib.asynccontextmanager
async def balanced_orchestrator(data_dir: Path, *, synthetic_ttft_ms: float) -> AsyncIterator[BalancedMesh]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = {}
        for name in ("node-a", "node-b"):
            # A prefill slower than a decode step, as on a real node (see the balancer's cold-start limit
            # in docs/orchestrator.md).
            settings = InferenceSettings(port=0, node_id=name, backend="synthetic", synthetic_tokens_per_s=200,
                                         synthetic_ttft_ms=synthetic_ttft_ms, n_ctx=2048, n_seq_max=4,
                                         data_dir=str(data_dir / name))
            node = await start_service(build_inference(settings), settings)
            stack.push_async_callback(node.stop, 0)
            nodes[f"127.0.0.1:{node.port}"] = node
        tools = FakeTools()
        settings = Settings(port=0, inference_nodes=",".join(nodes), event_batch_ms=5, retry_base_ms=10)
        svc = await stack.enter_async_context(running_service(
            build_app(settings, store=MemoryStore(), tools=tools, policy=FakePolicy(tools)), settings))
        # As the gateway: the tenant each request names is honoured (the test's and the bench's alike).
        channel = await stack.enter_async_context(service_channel(f"127.0.0.1:{svc.port}", "gateway"))
        yield BalancedMesh(orchestrator_pb2_grpc.AgentServiceStub(channel), nodes, svc.app.inference_balancer)
