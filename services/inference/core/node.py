"""What the node's RPCs do, past decoding: resolve the model name, its alias and the tenant, then serve.

A request names the node's model or one of its aliases; an alias supplies
sampling defaults for the fields the request leaves at zero. The tenant's
policy caps the request's priority and says what it may share (cache,
merging). The servicer decodes a request into ``GenerateCall`` and encodes
what comes back; everything in between is here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.common.errors import NotFound, Unimplemented, require
from services.common.tenants import TenantPolicy, policy_for
from services.inference.core.aliases import ModelAlias
from services.inference.core.embedding import EmbeddingRunner, EmbedResult
from services.inference.core.front import GenerationFront
from services.inference.core.merging import DeltaStream
from services.inference.core.pool import EnginePool
from services.inference.core.text import check_token_ids
from services.inference.core.types import GenerateSpec, Priority, SamplingParams, session_key


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling as the caller sent it: a zero means "the default" (the alias's, else the node's)."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    grammar: str = ""
    logprobs: bool = False
    top_logprobs: int = 0
    #: The request carried sampling at all; without it max_tokens is the node's default.
    given: bool = False


@dataclass(frozen=True)
class GenerateCall:
    """One Generate request, decoded: ``spec`` as asked, before the alias's defaults and the tenant's caps."""

    spec: GenerateSpec
    sampling: SamplingRequest = field(default_factory=SamplingRequest)
    model: str = ""
    require_cached_session: bool = False
    skip_cache: bool = False
    semantic_cache: bool = False


@dataclass(frozen=True)
class ModelInfo:
    name: str
    n_ctx: int
    n_gpu_layers: int
    device: str


def resolve_sampling(request: SamplingRequest, default_max_tokens: int,
                     alias: Mapping[str, float | int] | None = None) -> SamplingParams:
    """Zero values mean the defaults: the model alias's, else the server's.

    max_tokens must be > 0 once sampling is given, unless the alias supplies it.
    """
    defaults = alias or {}

    def pick(value: float | int, key: str, server_default: float | int) -> float | int:
        return value if value != 0 else defaults.get(key, server_default)

    seed = request.seed if request.seed is not None else defaults.get("seed")
    return SamplingParams(
        temperature=float(pick(request.temperature, "temperature", 0.0)),
        top_p=float(pick(request.top_p, "top_p", 1.0)),
        top_k=int(pick(request.top_k, "top_k", 0)),
        min_p=float(pick(request.min_p, "min_p", 0.0)),
        repeat_penalty=float(pick(request.repeat_penalty, "repeat_penalty", 1.0)),
        seed=int(seed) if seed is not None else None,
        max_tokens=int(pick(request.max_tokens, "max_tokens", 0 if request.given else default_max_tokens)),
        stop=request.stop,
        grammar=request.grammar,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
    )


class InferenceNode:
    def __init__(self, pool: Callable[[], EnginePool], default_max_tokens: int,
                 front: Callable[[], GenerationFront] | None = None,
                 aliases: Mapping[str, ModelAlias] | None = None,
                 tenants: Mapping[str, TenantPolicy] | None = None,
                 embeddings: Callable[[], EmbeddingRunner] | None = None) -> None:
        # The pool exists once the model is loaded; until then this raises UNAVAILABLE.
        self._pool = pool
        # Response cache and request merging in front of the pool; without it requests go straight in.
        self._front = front
        # Embed's runner (the node's own embedder), ready with the pool.
        self._embeddings = embeddings
        # More names for the loaded model, each with its own sampling defaults.
        self.aliases = dict(aliases or {})
        self.tenants = dict(tenants or {})
        self.default_max_tokens = default_max_tokens

    @property
    def pool(self) -> EnginePool:
        return self._pool()

    def served_name(self, model: str) -> str:
        """The name a request for ``model`` is served under (empty: the loaded model's)."""
        served = self.pool.primary.backend.model_name
        if model and model != served and model not in self.aliases:
            names = ", ".join(repr(n) for n in (served, *self.aliases))
            raise NotFound(f"model: {model!r} is not served here (this node serves {names})", field="model")
        return model or served

    def spec(self, call: GenerateCall, tenant: TenantPolicy) -> GenerateSpec:
        alias = self.aliases.get(call.model)
        sampling = resolve_sampling(call.sampling, self.default_max_tokens, alias.defaults if alias else None)
        priority = Priority[tenant.clamp_priority(call.spec.priority.name.lower()).upper()]
        return dataclasses.replace(call.spec, sampling=sampling, priority=priority)

    async def generate(self, call: GenerateCall) -> tuple[str, DeltaStream]:
        """The name the call is served under, and its stream of deltas (cancel it when leaving)."""
        served = self.served_name(call.model)
        tenant = policy_for(self.tenants, call.spec.tenant_id)
        spec = self.spec(call, tenant)
        if self._front is None:
            return served, self.pool.submit(spec, require_session=call.require_cached_session)
        stream = await self._front().open(
            spec, require_session=call.require_cached_session, use_cache=tenant.cache and not call.skip_cache,
            semantic=tenant.semantic_cache and call.semantic_cache, merge=tenant.merge)
        return served, stream

    def tokenize(self, model: str, text: str, add_special: bool, parse_special: bool) -> list[int]:
        self.served_name(model)
        return self.pool.primary.backend.tokenize(text, add_special, parse_special)

    def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        self.served_name(model)
        backend = self.pool.primary.backend
        check_token_ids(tokens, backend.vocab_size(), "tokens")
        return backend.detokenize(list(tokens))

    def count_tokens(self, model: str, text: str, add_special: bool) -> tuple[int, int]:
        """(tokens in ``text``, the context size)."""
        self.served_name(model)
        backend = self.pool.primary.backend
        return len(backend.tokenize(text, add_special, True)), backend.n_ctx

    def models(self, page_size: int, page_token: str) -> list[ModelInfo]:
        require(page_size >= 0, "page_size", "must be >= 0")
        require(page_token == "", "page_token", "unknown page token (all models fit one page)")
        models = [ModelInfo(e.backend.model_name, e.backend.n_ctx, e.backend.n_gpu_layers, e.backend.device)
                  for e in self.pool.engines]
        primary = self.pool.primary.backend
        return models + [ModelInfo(name, primary.n_ctx, primary.n_gpu_layers, primary.device)
                         for name in self.aliases]

    async def release_session(self, session_id: str, tenant_id: str = "") -> bool:
        require(bool(session_id), "session_id", "is required")
        return await self.pool.release_session(session_key(tenant_id, session_id))

    async def embed(self, model: str, texts: Sequence[str], dimensions: int = 0) -> tuple[str, EmbedResult]:
        """The name the call is served under, and one vector per text."""
        served = self.served_name(model)
        if self._embeddings is None:
            raise Unimplemented("this node does not serve embeddings", reason="EMBEDDINGS_NOT_SERVED")
        return served, await self._embeddings().embed(texts, dimensions)
