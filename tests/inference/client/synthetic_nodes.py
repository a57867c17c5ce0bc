"""Real inference nodes for balancer tests: the inference service itself,
started in-process on its synthetic backend (fixed-rate tokens, no model),
so scheduling, queueing, session KV accounting and GetLoad are the real code.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.runtime import RunningService, running_service
from services.inference.config import Settings
from services.inference.server import build_app
from tests.support.auth import service_channel


@dataclass
class SyntheticNodeSpec:
    node_id: str
    tokens_per_s: float = 200.0
    ttft_ms: float = 10.0
    prefill_ms_per_token: float = 0.0
    n_seq_max: int = 4
    max_tokens: int = 8
    # 3.0 makes every delay three times as long: a 3x slower node.
    slowdown: float = 1.0
    model_name: str = "synthetic"

    def settings(self) -> Settings:
        return Settings(
            port=0,
            node_id=self.node_id,
            backend="synthetic",
            n_seq_max=self.n_seq_max,
            default_max_tokens=self.max_tokens,
            synthetic_tokens_per_s=self.tokens_per_s / self.slowdown,
            synthetic_ttft_ms=self.ttft_ms * self.slowdown,
            synthetic_prefill_ms_per_token=self.prefill_ms_per_token * self.slowdown,
            model_name=self.model_name,
        )


@contextlib.asynccontextmanager
async def synthetic_nodes(*specs: SyntheticNodeSpec) -> AsyncIterator[list[RunningService]]:
    """One real inference node per spec on loopback port 0; all stop on exit."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for spec in specs:
            settings = spec.settings()
            node = await stack.enter_async_context(running_service(build_app(settings), settings))
            await warm_key_cache(node.address)
            nodes.append(node)
        yield nodes


async def warm_key_cache(address: str) -> None:
    """Have the node verify the balancer's key (the orchestrator's) once.

    A key's first call runs the KDF (tens of ms, more on a busy machine):
    longer than the 0.1 s deadline FAST_SETTINGS gives the balancer's first
    ListModels, and enough to skew the first TTFT the balancer measures.
    Later calls hit the node's cache, as they do in a running mesh.
    """
    async with service_channel(address, "orchestrator") as channel:
        await inference_pb2_grpc.InferenceServiceStub(channel).GetLoad(inference_pb2.GetLoadRequest(), timeout=30)
