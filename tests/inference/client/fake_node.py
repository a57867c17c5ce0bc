"""A fake inference node: the real InferenceService contract without a model.

It streams ``num_tokens`` tokens after a time to first token, one token per
``token_interval_ms``, decodes at most ``num_sequences`` requests at once
(the rest queue, as on a real node) and keeps a per-session "KV cache":
the prompt tokens a session already prefilled are not paid for again, so
session affinity changes TTFT as it does on llama.cpp. ``slowdown``
multiplies every delay (a 3x slower node), ``fail_next`` makes the next
requests fail before their first token. Served on port 0 through the shared
runtime, with the same health, interceptors and reflection as a real node.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common import errors
from services.common.runtime import RunningService, running_service
from services.common.settings import ServerSettings
from tests.inference.client.synthetic_nodes import warm_key_cache

SERVICE_NAME = "llmesh.inference.v1.InferenceService"


@dataclass
class FakeNodeConfig:
    node_id: str = "fake"
    ttft_ms: float = 10.0
    token_interval_ms: float = 2.0
    num_tokens: int = 8
    num_sequences: int = 4
    # Extra TTFT per prompt token not already in the session's cache.
    prefill_ms_per_token: float = 0.0
    slowdown: float = 1.0
    fail_next: int = 0
    # KV cells of the node; sessions hold their prompt + output tokens.
    kv_total_cells: int = 65_536


@dataclass
class FakeNodeStats:
    num_requests: int = 0
    num_cache_hits: int = 0
    sessions_seen: Counter[str] = field(default_factory=Counter)


class FakeInferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, config: FakeNodeConfig) -> None:
        self.config = config
        self.stats = FakeNodeStats()
        self._slots = asyncio.Semaphore(config.num_sequences)
        self._num_waiting = 0
        self._num_running = 0
        # session_id -> prompt tokens this node holds in its cache
        self._session_kv: dict[str, int] = {}

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateResponse]:
        cfg = self.config
        self.stats.num_requests += 1
        errors.require(bool(request.prompt or request.prompt_tokens), "prompt", "prompt or prompt_tokens is required")
        arrived = time.monotonic()
        if cfg.fail_next > 0:
            cfg.fail_next -= 1
            raise errors.Unavailable(f"{cfg.node_id} is failing on purpose", reason="FAKE_FAILURE")
        self._num_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._num_waiting -= 1
        self._num_running += 1
        try:
            num_prompt = len(request.prompt_tokens) or len(request.prompt.split())
            num_cached = min(self._session_kv.get(request.session_id, 0), num_prompt) if request.session_id else 0
            if num_cached:
                self.stats.num_cache_hits += 1
            if request.session_id:
                self.stats.sessions_seen[request.session_id] += 1
            prefill_ms = cfg.ttft_ms + cfg.prefill_ms_per_token * (num_prompt - num_cached)
            await asyncio.sleep(prefill_ms * cfg.slowdown / 1000)
            ttft_ms = (time.monotonic() - arrived) * 1000
            num_tokens = request.sampling.max_tokens or cfg.num_tokens
            for i in range(num_tokens):
                if i:
                    await asyncio.sleep(cfg.token_interval_ms * cfg.slowdown / 1000)
                yield inference_pb2.GenerateResponse(text=f" t{i}", token_ids=[100 + i], node_id=cfg.node_id)
            if request.session_id:
                self._session_kv[request.session_id] = num_prompt + num_tokens
            yield inference_pb2.GenerateResponse(
                node_id=cfg.node_id, finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                usage=inference_pb2.Usage(prompt_tokens=num_prompt, cached_tokens=num_cached,
                                          generated_tokens=num_tokens, ttft_ms=ttft_ms,
                                          total_ms=(time.monotonic() - arrived) * 1000))
        finally:
            self._num_running -= 1
            self._slots.release()

    async def CountTokens(self, request: inference_pb2.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> inference_pb2.CountTokensResponse:
        errors.require(bool(request.text), "text", "must not be empty")
        return inference_pb2.CountTokensResponse(num_tokens=len(request.text.split()), n_ctx=2048)

    async def GetLoad(self, request: inference_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> inference_pb2.GetLoadResponse:
        slots = self.config.num_sequences
        total = self.config.kv_total_cells
        used = min(total, sum(self._session_kv.values()))
        return inference_pb2.GetLoadResponse(
            node_id=self.config.node_id, queue_depth=self._num_waiting, num_running=self._num_running,
            num_free_sequences=slots - self._num_running, num_sequences=slots,
            kv_used_cells=used, kv_total_cells=total, kv_usage=used / total,
            num_sessions=len(self._session_kv))


class FakeNodeApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: FakeNodeConfig) -> None:
        self.servicer = FakeInferenceServicer(config)

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class FakeNode:
    app: FakeNodeApp
    running: RunningService

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def config(self) -> FakeNodeConfig:
        return self.app.servicer.config

    @property
    def stats(self) -> FakeNodeStats:
        return self.app.servicer.stats

    async def kill(self) -> None:
        """Stop abruptly: no drain, in-flight calls are cut (a crashed process, as clients see it)."""
        await self.running.server.stop(0)
        self.running.stopped.set()


@contextlib.asynccontextmanager
async def fake_nodes(*configs: FakeNodeConfig) -> AsyncIterator[list[FakeNode]]:
    """Start one fake node per config on loopback port 0; all stop on exit."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for config in configs:
            app = FakeNodeApp(config)
            running = await stack.enter_async_context(running_service(app, ServerSettings(port=0)))
            await warm_key_cache(running.address)
            nodes.append(FakeNode(app, running))
        yield nodes
