"""What the OpenAI-compatible layer needs from inference, as plain dataclasses.

The adapter over the InferenceService stub (or the load balancer, which has
the same Generate) implements ``TextGenerator``; tests pass fakes.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


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


class TextGenerator(Protocol):
    def generate(self, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        """Chunks of the completion; the last carries finish_reason and usage."""

    async def list_models(self) -> list[str]:
        """Names of the models the pool serves."""
