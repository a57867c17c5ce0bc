"""Model chains and cascades: which models serve a request, in what order.

The ``Balancer`` is the transport: it streams one model's answer from the
best node serving that model, retrying on another node until the first
token. The ``Router`` above it decides the models: ``auto`` picks a chain
from the models healthy nodes serve now (``ModelRouter``), a named model
walks its fallbacks while nothing was streamed, and a cascade asks a small
model first and escalates to a large one when its answer fails a check.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import replace

from llmesh.inference.v1 import inference_pb2
from opentelemetry import trace
from prometheus_client import Counter

from services.common import errors
from services.common.tenants import parse_tenant_policies, policy_for
from services.inference.client.cascade import Answer, CascadeSpec, parse_cascades
from services.inference.client.config import BalancerSettings
from services.inference.client.core.node_state import NodeState
from services.inference.client.routing import (
    FALLBACK_ERRORS,
    Attempt,
    ModelProfile,
    ModelRegistry,
    ModelRouter,
    RouteRequest,
    chain_exhausted,
    estimate_complexity,
    failed_attempt,
    parse_fallbacks,
    parse_model_profiles,
    parse_tier_thresholds,
)

log = logging.getLogger("llmesh.balancer")

ROUTED = Counter("llmesh_balancer_routed_total", "Requests served along a model chain (auto or with fallbacks).",
                 ["model", "fell_back"])
FALLBACKS = Counter("llmesh_balancer_fallbacks_total", "Models skipped in a chain before answering.",
                    ["model", "error"])
ESCALATIONS = Counter("llmesh_balancer_cascade_total",
                      "Cascade requests, by cascade and outcome (kept, or why the small answer was escalated).",
                      ["cascade", "outcome"])
# The model name that asks the router to choose.
AUTO_MODEL = "auto"
# max_tokens assumed for routing when a request leaves it to the node.
DEFAULT_ROUTE_MAX_TOKENS = 256

#: Streams one model's answer: (request, session_id, timeout) -> replies.
ModelTransport = Callable[[inference_pb2.GenerateRequest, str | None, float | None],
                          AsyncGenerator[inference_pb2.GenerateResponse, None]]


def remaining_s(deadline: float | None, now: float) -> float | None:
    """Seconds left before ``deadline`` (None: no deadline); past it, DEADLINE_EXCEEDED."""
    if deadline is None:
        return None
    remaining = deadline - now
    if remaining <= 0:
        raise errors.DeadlineExceeded("deadline passed before any inference node answered")
    return remaining


def with_model(request: inference_pb2.GenerateRequest, model: str) -> inference_pb2.GenerateRequest:
    """A copy of ``request`` for another model (one step of a chain or cascade)."""
    copy = inference_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.model = model
    return copy


class Router:
    """Model chains and cascades over a transport that serves one model at a time."""

    def __init__(self, settings: BalancerSettings, transport: ModelTransport,
                 nodes: Callable[[], Mapping[str, NodeState]], clock: Callable[[], float]) -> None:
        self.settings = settings
        self._transport = transport
        self._nodes = nodes
        self._clock = clock
        self.profiles = parse_model_profiles(settings.model_profiles)
        self.fallbacks = parse_fallbacks(settings.model_fallbacks)
        self.router_config = parse_tier_thresholds(settings.route_tier_thresholds)
        self.cascades = parse_cascades(settings.model_cascades)
        self.tenants = parse_tenant_policies(settings.tenant_policies)

    def registry(self) -> ModelRegistry:
        """The model names healthy nodes serve now, with their configured profiles."""
        now = self._clock()
        contexts: dict[str, int] = {}
        served: dict[str, list[str]] = {}
        for address, state in self._nodes().items():
            if state.models is None or not state.is_available(now):
                continue
            for name, n_ctx in state.models.items():
                contexts[name] = min(contexts.get(name, n_ctx), n_ctx)
                served.setdefault(name, []).append(address)
        registry = ModelRegistry()
        for name, addresses in served.items():
            profile = replace(self.profiles.get(name) or ModelProfile(name), context_tokens=contexts[name])
            for address in addresses:
                registry.register(address, profile)
        return registry

    def model_chain(self, request: inference_pb2.GenerateRequest) -> list[str]:
        """Models to try for a request, in order: the router's chain for "auto", else the name and its fallbacks."""
        if request.model != AUTO_MODEL:
            return [request.model, *self.fallbacks.get(request.model, ())]
        errors.require(not request.prompt_tokens, "model",
                       f"{AUTO_MODEL!r} needs a text prompt: token ids belong to one model's vocabulary")
        caps = [c for c in (request.route_max_cost, policy_for(self.tenants, request.tenant_id).route_max_cost)
                if c > 0]
        route = RouteRequest(
            # About four characters a token: the router only compares it with context sizes.
            prompt_tokens=max(1, len(request.prompt) // 4),
            max_tokens=request.sampling.max_tokens or DEFAULT_ROUTE_MAX_TOKENS,
            capabilities=frozenset({"grammar"}) if request.sampling.grammar else frozenset(),
            max_cost=min(caps) if caps else None,
            max_latency_ms=request.route_max_latency_ms or None,
            complexity=estimate_complexity(request.prompt))
        return [p.name for p in ModelRouter(self.registry(), self.router_config).chain(route)]

    async def generate(self, request: inference_pb2.GenerateRequest, *, session_id: str | None = None,
                       timeout: float | None = None) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """Stream a generation, moving along the request's model chain while no token was streamed.

        A plain model name without fallbacks goes straight to ``_generate_on_model``.
        """
        spec = self.cascades.get(request.model)
        if spec is not None:
            # The small model's answer is judged as one text: several choices would be judged as one.
            errors.require(request.n <= 1, "n", f"cascade {request.model!r} answers with one choice")
            async with contextlib.aclosing(self._cascade(request, spec, session_id, timeout)) as stream:
                async for reply in stream:
                    yield reply
            return
        chain = self.model_chain(request)
        if chain == [request.model]:
            async with contextlib.aclosing(self._transport(request, session_id, timeout)) as stream:
                async for reply in stream:
                    yield reply
            return
        failed: list[Attempt] = []
        # ``timeout`` covers the whole chain, not each model of it.
        deadline = None if timeout is None else self._clock() + timeout
        for index, model in enumerate(chain):
            attempt = with_model(request, model)
            first_within = self.settings.fallback_after_s if index < len(chain) - 1 else 0.0
            remaining = remaining_s(deadline, self._clock())
            async with contextlib.aclosing(self._transport(attempt, session_id, remaining)) as stream:
                try:
                    first = await (asyncio.wait_for(anext(stream), first_within) if first_within else anext(stream))
                except StopAsyncIteration:
                    return
                except FALLBACK_ERRORS as exc:
                    failed.append(failed_attempt(model, exc))
                    FALLBACKS.labels(model, type(exc).__name__).inc()
                    continue
                ROUTED.labels(model, str(bool(failed)).lower()).inc()
                span = trace.get_current_span()
                span.set_attribute("llmesh.route.model", model)
                span.set_attribute("llmesh.route.fell_back", bool(failed))
                yield first
                async for reply in stream:
                    yield reply
            return
        raise chain_exhausted(failed)

    async def _cascade(self, request: inference_pb2.GenerateRequest, spec: CascadeSpec, session_id: str | None,
                       timeout: float | None) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The small model's whole answer is checked before anything is sent; a failed check escalates.

        So a cascade's first token arrives with the small model's last one
        (or the large model's first); its win is the large model not running.
        """
        deadline = None if timeout is None else self._clock() + timeout
        small = with_model(request, spec.small)
        small.logprobs = True
        replies: list[inference_pb2.GenerateResponse] = []
        try:
            async with contextlib.aclosing(self.generate(small, session_id=session_id, timeout=timeout)) as stream:
                replies = [reply async for reply in stream]
            answer = Answer("".join(r.text for r in replies), [lp for r in replies for lp in r.logprobs])
            reason = spec.check.failure(answer)
        except FALLBACK_ERRORS as exc:
            reason = "small_failed"
            log.info("cascade small model failed", extra={"event": "cascade_small_failed", "model": spec.small,
                                                         "error": str(exc)})
        span = trace.get_current_span()
        span.set_attribute("llmesh.route.escalated", reason is not None)
        ESCALATIONS.labels(request.model, reason or "kept").inc()
        if reason is None:
            span.set_attribute("llmesh.route.model", spec.small)
            for reply in replies:
                if not request.logprobs:
                    del reply.logprobs[:]
                    del reply.token_pieces[:]
                yield reply
            return
        span.set_attribute("llmesh.route.escalation_reason", reason)
        async with contextlib.aclosing(self.generate(with_model(request, spec.large), session_id=session_id,
                                                     timeout=remaining_s(deadline, self._clock()))) as stream:
            async for reply in stream:
                yield reply
