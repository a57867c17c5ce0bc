"""What the OpenAI-compatible layer needs from inference, as plain dataclasses.

The adapter over the InferenceService stub (or the load balancer, which has
the same Generate) implements ``TextGenerator`` and ``EmbeddingSource``;
tests pass fakes.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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
    # Session whose KV cache the prompt extends on the node (a stored response chain); empty: none.
    session_id: str = ""


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


@dataclass(frozen=True)
class StoredItem:
    """One conversation item of a response chain, as the store keeps it (a message of the chain's session)."""
    # user, assistant, system or tool (the store's roles).
    role: str
    content: str
    # The response whose input or output this item is, the item as the API shows it, and whether it was input.
    response_id: str
    item: dict[str, Any]
    is_input: bool
    # What the model saw or said, exactly: the prompt renders it (an output's raw text keeps the KV prefix).
    raw: str = ""


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class ChainLock:
    acquired: bool
    fencing_token: int = 0


class ResponseLog(Protocol):
    """Where /v1/responses keeps its chains: a session per chain in the store, scoped to the caller's tenant.

    Items are the chain's messages; events are response snapshots, stream events of
    background responses and cancel requests, numbered by the store.
    """

    async def create_chain(self, chain_id: str) -> None:
        """A new chain (ALREADY_EXISTS if the id is taken)."""

    async def lock(self, chain_id: str, owner: str, lease_ms: int) -> ChainLock:
        """Take or renew the chain's write lock; not acquired while another owner's lease lasts."""

    async def unlock(self, chain_id: str, owner: str) -> None:
        """Give the lock back (nothing if ``owner`` does not hold it)."""

    async def append_items(self, chain_id: str, items: Sequence[StoredItem], fencing_token: int = 0) -> None:
        """Add items at the end of the chain, refused if the fencing token is stale."""

    async def list_items(self, chain_id: str) -> list[StoredItem]:
        """Every item of the chain, in order (NOT_FOUND for an unknown chain)."""

    async def append_events(self, chain_id: str, events: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Store events (kind, payload) with no drop; their seqs."""

    async def read_events(self, chain_id: str, after_seq: int = 0) -> list[StoredEvent]:
        """Stored events after ``after_seq``, in order (NOT_FOUND for an unknown chain)."""

    def watch_events(self, chain_id: str, after_seq: int) -> AsyncIterator[StoredEvent]:
        """Events after ``after_seq``: the stored ones, then new ones as they are appended."""
