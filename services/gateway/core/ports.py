"""What the OpenAI-compatible layer needs from inference, as plain dataclasses.

The adapter over the InferenceService stub (or the load balancer, which has
the same Generate) implements ``TextGenerator`` and ``EmbeddingSource``;
tests pass fakes.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    model: str = ""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # GBNF grammar; empty means unconstrained.
    grammar: str = ""
    request_id: str = ""
    metadata: tuple[tuple[str, str], ...] = field(default=())
    # The authenticated caller's tenant: picks the node's per-tenant settings.
    tenant_id: str = ""
    # Each generated token's log-probability, and this many likeliest tokens per step.
    logprobs: bool = False
    top_logprobs: int = 0
    # Choices decoded from one prefill of the prompt.
    n: int = 1


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as the node reported it: its bytes, log-probability and likeliest rivals."""
    piece: bytes
    logprob: float
    # (bytes, log-probability) of the step's likeliest tokens, most likely first.
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    text: str
    # "stop", "length" or "cancelled" on the last chunk, else None.
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    # The model that answered, on the last chunk (a routed or fallen-back
    # request may be served by another name than it asked for).
    model: str = ""
    # With logprobs: the tokens this chunk's generation step produced.
    tokens: tuple[TokenLogprob, ...] = ()
    # The choice (of GenerationParams.n) this chunk belongs to.
    index: int = 0


class TextGenerator(Protocol):
    def generate(self, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        """Chunks of the completion; the last carries finish_reason and usage."""

    async def list_models(self) -> list[str]:
        """Names of the models the pool serves."""


@dataclass(frozen=True)
class EmbeddingParams:
    inputs: tuple[str, ...]
    model: str = ""
    # The vector length the caller expects; 0: the model's own.
    dimensions: int = 0
    request_id: str = ""
    metadata: tuple[tuple[str, str], ...] = field(default=())
    tenant_id: str = ""


@dataclass(frozen=True)
class EmbeddingResult:
    # One L2-normalised vector per input, in order.
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int
    # The model that computed them.
    model: str = ""


@runtime_checkable
class EmbeddingSource(Protocol):
    """What ``/v1/embeddings`` needs: the TextGenerator adapters that reach a node implement it too."""

    async def embed(self, params: EmbeddingParams) -> EmbeddingResult:
        """Vectors of ``params.inputs`` from the node's own model."""
