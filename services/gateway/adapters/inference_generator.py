"""TextGenerator (and EmbeddingSource) over llmesh.inference.v1 Generate and Embed: a stub or the load balancer.

Two shapes work: an InferenceServiceStub (``Generate(request, metadata=...)``
and ``ListModels``), or the load balancer of ``services.inference.client``
(``generate(request)`` streaming GenerateResponse, ``unary("ListModels", ...)``),
which picks a node per request and raises domain errors itself; Embed goes
through its ``unary`` like ListModels.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.rpc_errors import domain_error_from_rpc
from services.gateway.core.ports import (
    EmbeddingParams,
    EmbeddingResult,
    GenerationChunk,
    GenerationParams,
    TokenLogprob,
)

_FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length",
           inference_pb2.FINISH_REASON_CANCELLED: "cancelled"}


def to_generate_request(params: GenerationParams) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
        stop=list(params.stop), grammar=params.grammar)
    if params.seed is not None:
        sampling.seed = params.seed
    return inference_pb2.GenerateRequest(request_id=params.request_id, model=params.model, prompt=params.prompt,
                                         sampling=sampling, priority=inference_pb2.PRIORITY_INTERACTIVE,
                                         tenant_id=params.tenant_id, logprobs=params.logprobs,
                                         session_id=params.session_id, top_logprobs=params.top_logprobs, n=params.n)


def to_chunk(reply: inference_pb2.GenerateResponse) -> GenerationChunk:
    usage = reply.usage
    tops = list(reply.top_logprobs)
    tokens = tuple(TokenLogprob(piece, logprob, tuple(zip(tops[i].pieces, tops[i].logprobs, strict=True))
                                if i < len(tops) else ())
                   for i, (piece, logprob) in enumerate(zip(reply.token_pieces, reply.logprobs, strict=False)))
    return GenerationChunk(text=reply.text, finish_reason=_FINISH.get(reply.finish_reason),
                           prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                           generated_tokens=usage.generated_tokens, model=reply.model, tokens=tokens,
                           index=reply.index)


class InferenceGenerator:
    def __init__(self, client: Any, default_models: tuple[str, ...] = ()) -> None:
        self.client = client
        self.default_models = default_models

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel, default_models: tuple[str, ...] = ()) -> InferenceGenerator:
        return cls(inference_pb2_grpc.InferenceServiceStub(channel), default_models)

    def _call(self, request: inference_pb2.GenerateRequest, metadata: tuple[tuple[str, str], ...]) -> Any:
        balanced = getattr(self.client, "generate", None)
        if balanced is not None:
            return balanced(request)
        return self.client.Generate(request, metadata=metadata)

    async def generate(self, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        stream = self._call(to_generate_request(params), params.metadata)
        try:
            async for reply in stream:
                yield to_chunk(reply)
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc(err, service="inference") from None
        finally:
            if hasattr(stream, "cancel"):
                stream.cancel()

    async def list_models(self) -> list[str]:
        registry = getattr(self.client, "registry", None)
        if registry is not None:
            # Behind the balancer: every name some healthy node serves, not one node's list.
            served = [profile.name for profile in registry().served]
            if served:
                return served
        request = inference_pb2.ListModelsRequest(page_size=100)
        try:
            if hasattr(self.client, "unary"):
                reply = await self.client.unary("ListModels", request)
            else:
                reply = await self.client.ListModels(request)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED and self.default_models:
                return list(self.default_models)
            raise domain_error_from_rpc(err, service="inference") from None
        return [m.name for m in reply.models] or list(self.default_models)

    async def embed(self, params: EmbeddingParams) -> EmbeddingResult:
        """Embed on a node serving ``params.model`` (behind the balancer: any healthy one, retried elsewhere)."""
        request = inference_pb2.EmbedRequest(request_id=params.request_id, model=params.model,
                                             inputs=list(params.inputs), tenant_id=params.tenant_id,
                                             dimensions=params.dimensions)
        try:
            if hasattr(self.client, "unary"):
                reply = await self.client.unary("Embed", request)
            else:
                reply = await self.client.Embed(request, metadata=params.metadata)
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc(err, service="inference") from None
        return EmbeddingResult(tuple(tuple(e.values) for e in reply.embeddings), reply.prompt_tokens, reply.model)
