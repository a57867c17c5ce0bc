"""InferenceService: decode the request, call the node's core, encode the reply."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc
from opentelemetry import trace

from services.inference import convert
from services.inference.core.node import InferenceNode


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, node: InferenceNode, node_id: str) -> None:
        self.node = node
        self.node_id = node_id

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        served, stream = await self.node.generate(convert.generate_call(request))
        span = trace.get_current_span()
        # Which model and which node served a turn, so a slow trace points at a node.
        span.set_attribute("model", served)
        span.set_attribute("node", self.node_id)
        try:
            async for delta in stream:
                if delta.finish_reason is not None:
                    span.set_attribute("llmesh.inference.cache_hit", delta.cached)
                    span.set_attribute("llmesh.inference.merged", delta.merged)
                    span.set_attribute("llmesh.inference.model", served)
                yield convert.generate_response(delta, self.node_id, served)
        finally:
            # A client that went away (or any early exit) frees its sequence now.
            stream.cancel()

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(tokens=self.node.tokenize(request.model, request.text, request.add_special,
                                                             request.parse_special))

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        return pb.DetokenizeResponse(text=self.node.detokenize(request.model, request.tokens))

    async def CountTokens(self, request: pb.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        num_tokens, n_ctx = self.node.count_tokens(request.model, request.text, request.add_special)
        return pb.CountTokensResponse(num_tokens=num_tokens, n_ctx=n_ctx)

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        return convert.load_response(self.node.pool.load(), self.node_id)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        models = self.node.models(request.page_size, request.page_token)
        return pb.ListModelsResponse(models=[convert.model(m) for m in models])

    async def ReleaseSession(self, request: pb.ReleaseSessionRequest,
                             context: grpc.aio.ServicerContext) -> pb.ReleaseSessionResponse:
        return pb.ReleaseSessionResponse(released=await self.node.release_session(request.session_id,
                                                                              request.tenant_id))

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        served, result = await self.node.embed(request.model, list(request.inputs), request.dimensions)
        return convert.embed_response(result, self.node_id, served)
