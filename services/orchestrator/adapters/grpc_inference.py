"""InferencePort over llmesh.inference.v1 (one node, or any stub-like client such as a balancer)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.rpc_errors import domain_error_from_rpc, domain_errors
from services.orchestrator.core.events import Usage
from services.orchestrator.core.ports import GenerationChunk, GenerationRequest

_FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length",
           inference_pb2.FINISH_REASON_CANCELLED: "cancelled"}


class _BalancerAsStub:
    """Presents `services.inference.client.Balancer` with the stub's method names."""

    def __init__(self, balancer: Any) -> None:
        self._balancer = balancer

    async def Tokenize(self, request):
        return await self._balancer.unary("Tokenize", request)

    async def CountTokens(self, request):
        return await self._balancer.unary("CountTokens", request)

    def Generate(self, request):
        return self._balancer.generate(request, session_id=request.session_id or None)


class GrpcInference:
    """`client` is an InferenceService stub or a load balancer (unary()/generate())."""

    def __init__(self, client: Any) -> None:
        if hasattr(client, "unary") and hasattr(client, "generate"):
            client = _BalancerAsStub(client)
        self._client = client

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel) -> GrpcInference:
        return cls(inference_pb2_grpc.InferenceServiceStub(channel))

    async def tokenize(self, text: str, *, model: str = "", add_special: bool = False) -> list[int]:
        with domain_errors("inference"):
            reply = await self._client.Tokenize(inference_pb2.TokenizeRequest(
                model=model, text=text, add_special=add_special, parse_special=True))
        return list(reply.tokens)

    async def context_size(self, model: str = "") -> int:
        with domain_errors("inference"):
            reply = await self._client.CountTokens(inference_pb2.CountTokensRequest(model=model, text=""))
        return reply.n_ctx

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        sampling = inference_pb2.SamplingParams(temperature=request.temperature, max_tokens=request.max_tokens,
                                                stop=list(request.stop), grammar=request.grammar)
        if request.seed is not None:
            sampling.seed = request.seed
        # protoc's .pyi types enum fields as the enum class (no int constructor at runtime); the numbers match.
        priority = cast(inference_pb2.Priority, request.priority)
        call = self._client.Generate(inference_pb2.GenerateRequest(
            request_id=request.request_id, model=request.model, session_id=request.session_id,
            prompt_tokens=list(request.prompt_tokens), sampling=sampling, priority=priority,
            tenant_id=request.tenant_id))
        try:
            async for reply in call:
                usage = None
                if reply.HasField("usage"):
                    u = reply.usage
                    usage = Usage(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
                                  generated_tokens=u.generated_tokens, num_model_calls=1)
                yield GenerationChunk(text=reply.text, finish_reason=_FINISH.get(reply.finish_reason, ""),
                                      usage=usage, ttft_ms=reply.usage.ttft_ms if usage else 0.0)
        except grpc.RpcError as err:
            raise domain_error_from_rpc(err, service="inference") from None
        finally:
            if hasattr(call, "cancel"):
                call.cancel()
            elif hasattr(call, "aclose"):
                await call.aclose()
