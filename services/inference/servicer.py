"""InferenceService: decode the request, call the engine pool, encode the reply."""
from __future__ import annotations

from typing import AsyncIterator, Callable, Mapping

import grpc
from opentelemetry import trace
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.tenants import TenantPolicy, policy_for
from services.common.errors import InvalidArgument, NotFound, require
from services.inference import convert
from services.inference.core.aliases import ModelAlias
from services.inference.core.front import GenerationFront
from services.inference.core.pool import EnginePool


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, pool: Callable[[], EnginePool], node_id: str, default_max_tokens: int,
                 front: Callable[[], GenerationFront] | None = None,
                 aliases: Mapping[str, ModelAlias] | None = None,
                 tenants: Mapping[str, TenantPolicy] | None = None) -> None:
        # The pool exists once the model is loaded; until then this raises UNAVAILABLE.
        self._pool = pool
        # Response cache and request merging in front of the pool; without it requests go straight in.
        self._front = front
        # More names for the loaded model, each with its own sampling defaults.
        self.aliases = dict(aliases or {})
        self.tenants = dict(tenants or {})
        self.node_id = node_id
        self.default_max_tokens = default_max_tokens

    @property
    def pool(self) -> EnginePool:
        return self._pool()

    def _check_model(self, model: str) -> None:
        served = self.pool.primary.backend.model_name
        if model and model != served and model not in self.aliases:
            names = ", ".join(repr(n) for n in (served, *self.aliases))
            raise NotFound(f"model: {model!r} is not served here (this node serves {names})", field="model")

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        self._check_model(request.model)
        alias = self.aliases.get(request.model)
        tenant = policy_for(self.tenants, request.tenant_id)
        spec = convert.generate_spec(request, self.default_max_tokens, alias.defaults if alias else None, tenant)
        if self._front is not None:
            handle = await self._front().open(
                spec, require_session=request.require_cached_session, use_cache=tenant.cache and not request.skip_cache,
                semantic=tenant.semantic_cache and request.semantic_cache, merge=tenant.merge)
        else:
            handle = self.pool.submit(spec, require_session=request.require_cached_session)
        span = trace.get_current_span()
        served = request.model or self.pool.primary.backend.model_name
        # Which model and which node served a turn, so a slow trace points at a node.
        span.set_attribute("model", served)
        span.set_attribute("node", self.node_id)
        try:
            async for delta in handle:
                if delta.finish_reason is not None:
                    span.set_attribute("llmesh.inference.cache_hit", delta.cached)
                    span.set_attribute("llmesh.inference.merged", delta.merged)
                    span.set_attribute("llmesh.inference.model", served)
                yield convert.generate_response(delta, self.node_id, served)
        finally:
            # A client that went away (or any early exit) frees its sequence now.
            handle.cancel()

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        self._check_model(request.model)
        backend = self.pool.primary.backend
        return pb.TokenizeResponse(tokens=backend.tokenize(request.text, request.add_special, request.parse_special))

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        self._check_model(request.model)
        backend = self.pool.primary.backend
        n_vocab = backend.vocab_size()
        bad = next((t for t in request.tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidArgument(f"tokens: token id {bad} is outside the vocabulary of {n_vocab}", field="tokens")
        return pb.DetokenizeResponse(text=backend.detokenize(list(request.tokens)))

    async def CountTokens(self, request: pb.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        self._check_model(request.model)
        backend = self.pool.primary.backend
        tokens = backend.tokenize(request.text, request.add_special, True)
        return pb.CountTokensResponse(num_tokens=len(tokens), n_ctx=backend.n_ctx)

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        return convert.load_response(self.pool.load(), self.node_id)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        require(request.page_size >= 0, "page_size", "must be >= 0")
        require(request.page_token == "", "page_token", "unknown page token (all models fit one page)")
        models = [pb.Model(name=e.backend.model_name, n_ctx=e.backend.n_ctx, n_gpu_layers=e.backend.n_gpu_layers,
                           device=e.backend.device) for e in self.pool.engines]
        primary = self.pool.primary.backend
        models += [pb.Model(name=name, n_ctx=primary.n_ctx, n_gpu_layers=primary.n_gpu_layers, device=primary.device)
                   for name in self.aliases]
        return pb.ListModelsResponse(models=models)

    async def ReleaseSession(self, request: pb.ReleaseSessionRequest,
                             context: grpc.aio.ServicerContext) -> pb.ReleaseSessionResponse:
        require(bool(request.session_id), "session_id", "is required")
        return pb.ReleaseSessionResponse(released=await self.pool.release_session(request.session_id))
