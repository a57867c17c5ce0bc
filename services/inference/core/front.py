"""The economics front of a node: response cache, then request merging, then the engines.

Only deterministic, session-free requests are shared: greedy sampling
(temperature 0) or a fixed seed gives the same tokens for the same prompt, so
one decode can answer every identical request, now (merging) or later
(cache). Requests with a session are not shared: their turn must extend that
session's own KV cache.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from services.inference.core.merging import DeltaStream, MergedWaiter, SharedDecode
from services.inference.core.observer import EconomicsObserver
from services.inference.core.response_cache import ResponseCache, canonical_request_hash
from services.inference.core.semantic_cache import SemanticCache
from services.inference.core.types import Delta, GenerateSpec


class Submitter(Protocol):
    def submit(self, spec: GenerateSpec, *, require_session: bool = False) -> DeltaStream: ...


def is_deterministic(spec: GenerateSpec) -> bool:
    """One answer that repeats: what the caches and merging may share (several choices are not)."""
    return spec.n == 1 and (spec.sampling.temperature <= 0.0 or spec.sampling.seed is not None)


# A prompt with more than one user turn is a conversation, never answered from the semantic cache.
USER_TURN = "<start_of_turn>user"


def is_single_turn(spec: GenerateSpec) -> bool:
    return bool(spec.prompt) and spec.prompt.count(USER_TURN) <= 1


_TURN_MARKUP = re.compile(r"<start_of_turn>(?:user|model)\n?|<end_of_turn>\n?")


def semantic_text(prompt: str) -> str:
    """What a single-turn prompt asks, without its chat-template markup: the text the embedder compares."""
    return _TURN_MARKUP.sub("", prompt).strip()


def request_key(model: str, spec: GenerateSpec, *, with_prompt: bool = True) -> str:
    """Canonical hash of everything that decides the output tokens (without the prompt: the semantic scope)."""
    s = spec.sampling
    return canonical_request_hash({
        "tenant": spec.tenant_id,
        "model": model,
        "prompt": spec.prompt if with_prompt else None,
        "prompt_tokens": list(spec.prompt_tokens) if with_prompt else None,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
        # Greedy decoding ignores the seed, so it must not split the key.
        "seed": s.seed if s.temperature > 0.0 else None,
        "max_tokens": s.max_tokens,
        "stop": list(s.stop),
        "grammar": s.grammar,
        "logprobs": s.logprobs,
        "top_logprobs": s.top_logprobs,
    })


class CachedReplay:
    """A stored answer streamed again, marked cached, with this request's timings."""

    def __init__(self, deltas: list[Delta]) -> None:
        self._deltas = deltas
        self._start = time.monotonic()

    async def _replay(self) -> AsyncIterator[Delta]:
        first_ms: float | None = None
        for delta in self._deltas:
            elapsed_ms = (time.monotonic() - self._start) * 1000.0
            first_ms = elapsed_ms if first_ms is None else first_ms
            usage = delta.usage
            if usage is not None:
                usage = dataclasses.replace(usage, cached_tokens=usage.prompt_tokens,
                                            ttft_ms=first_ms, total_ms=elapsed_ms)
            yield dataclasses.replace(delta, usage=usage, cached=True, merged=False)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._replay()

    def cancel(self) -> None:
        return None


class GenerationFront:
    def __init__(self, engines: Submitter, model_name: str, *, merge: bool = True,
                 cache: ResponseCache[list[Delta]] | None = None,
                 semantic: SemanticCache[list[Delta]] | None = None,
                 observer: EconomicsObserver | None = None,
                 run_model: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None) -> None:
        """``run_model`` runs a model-backed embedder's work (the node passes its engine's ``call``,
        so all llama.cpp compute stays on the engine thread); without it, and for embedders that
        run no model, embeddings go to a worker thread."""
        self.engines = engines
        self.model_name = model_name
        self.merge = merge
        self.cache = cache
        self.semantic = semantic
        self.observer = observer or EconomicsObserver()
        self._in_flight: dict[str, SharedDecode] = {}
        self._run_model = run_model

    def submit(self, spec: GenerateSpec, *, require_session: bool = False, use_cache: bool = True,
               merge: bool = True) -> DeltaStream:
        """Raises what the engine raises at submission (InvalidArgument, ResourceExhausted, ...).

        ``merge=False`` keeps this request out of merging (a tenant's choice); the node-wide
        switch is ``self.merge``.
        """
        shareable = is_deterministic(spec) and not spec.session_id and not require_session
        caching = self.cache is not None and self.cache.enabled
        merging = self.merge and merge
        if not shareable or not (merging or caching):
            return self.engines.submit(spec, require_session=require_session)
        key = request_key(self.model_name, spec)
        if caching and use_cache:
            assert self.cache is not None
            stored = self.cache.get(key)
            stats = self.cache.stats()
            self.observer.on_cache_lookup(stored is not None, stats.hit_rate, stats.entries)
            if stored is not None:
                return CachedReplay(stored)
        shared = self._in_flight.get(key) if merging else None
        if shared is not None and not shared.abandoned:
            self.observer.on_merged()
            return shared.join(merged=True, priority=spec.priority)
        upstream = self.engines.submit(spec, require_session=require_session)
        shared = SharedDecode(upstream, lambda done: self._finished(key, done))
        if merging:
            self._in_flight[key] = shared
        return shared.join(merged=False)

    async def open(self, spec: GenerateSpec, *, require_session: bool = False, use_cache: bool = True,
                   semantic: bool = False, merge: bool = True) -> DeltaStream:
        """``submit``, after a semantic-cache lookup when the request opts in and qualifies."""
        eligible = (semantic and use_cache and self.semantic is not None and self.semantic.enabled
                    and is_deterministic(spec) and not spec.session_id and not require_session
                    and is_single_turn(spec))
        if not eligible:
            return self.submit(spec, require_session=require_session, use_cache=use_cache, merge=merge)
        assert self.semantic is not None
        cache = self.semantic
        scope = request_key(self.model_name, spec, with_prompt=False)
        # Keep the embedding off the event loop; one that runs the model goes to the engine thread.
        text = semantic_text(spec.prompt)
        if self._run_model is not None and cache.embedder.runs_model:
            vector = await self._run_model(lambda: cache.vector(text))
        else:
            vector = await asyncio.to_thread(cache.vector, text)
        hit = cache.lookup(scope, vector)
        self.observer.on_semantic_lookup(hit is not None, cache.hit_rate)
        if hit is not None:
            return CachedReplay(hit.value)
        stream = self.submit(spec, require_session=require_session, use_cache=use_cache, merge=merge)
        if isinstance(stream, MergedWaiter) and not stream.shared.semantic_store_registered:
            stream.shared.semantic_store_registered = True
            stream.shared.add_done_callback(
                lambda done: cache.store(scope, vector, list(done.deltas)) if done.completed else None)
        return stream

    def _finished(self, key: str, shared: SharedDecode) -> None:
        if self._in_flight.get(key) is shared:
            del self._in_flight[key]
        if shared.completed and self.cache is not None:
            self.cache.put(key, list(shared.deltas))

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)
