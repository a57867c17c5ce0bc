"""Dataclasses passed between the servicer, the engine and the backends."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class Priority(enum.IntEnum):
    """Lower value is served first."""

    INTERACTIVE = 0
    NORMAL = 1
    BATCH = 2


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    grammar: str = ""
    #: Report the log-probability of each sampled token under the model.
    logprobs: bool = False
    #: With logprobs: also report this many most likely tokens of each step (0-MAX_TOP_LOGPROBS).
    top_logprobs: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 and not self.grammar and self.repeat_penalty == 1.0


MAX_TOP_LOGPROBS = 20
#: Most choices one request may ask for (each takes a sequence of its own).
MAX_CHOICES = 8
#: The most likely tokens of one step, most likely first: (token id, log-probability).
Alternatives = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model's raw distribution, and what else was likely."""

    logprob: float
    top: Alternatives = ()


def session_key(tenant_id: str, session_id: str) -> str:
    """A node's key for a session: the same id under two tenants names two sessions,
    so one tenant can never reuse (or probe, by its cached tokens) another's KV cells."""
    return f"{tenant_id}\x1f{session_id}" if tenant_id and session_id else session_id


@dataclass(frozen=True)
class GenerateSpec:
    """One validated generation request, before tokenization of a text prompt."""

    prompt: str = ""
    prompt_tokens: tuple[int, ...] = ()
    session_id: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: Priority = Priority.NORMAL
    request_id: str = ""
    #: Cached and merged answers are shared within a tenant only.
    tenant_id: str = ""
    #: Choices decoded in parallel after one prefill of the prompt (the others copy its KV cells).
    n: int = 1


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True)
class Delta:
    """What one engine step added to a stream; the last one has finish_reason and usage."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: Exception | None = None
    #: Log-probability of each token in token_ids, when the request asked for them.
    logprobs: tuple[float, ...] = ()
    #: With logprobs: each token's bytes, and (with top_logprobs) each step's likeliest tokens.
    pieces: tuple[bytes, ...] = ()
    #: (token id, log-probability, bytes) of each step's likeliest tokens, most likely first.
    top_logprobs: tuple[tuple[tuple[int, float, bytes], ...], ...] = ()
    #: Which of the request's n choices this delta belongs to.
    index: int = 0
    #: Replayed from the response cache; no engine was involved.
    cached: bool = False
    #: Shared with an identical request that was already decoding.
    merged: bool = False


@dataclass(frozen=True)
class LoadReport:
    queue_depth: int
    num_running: int
    num_free_sequences: int
    num_sequences: int
    kv_used_cells: int
    kv_total_cells: int
    tokens_per_second: float
    num_sessions: int
    #: Cells that sharing saves: what the sequences hold minus the distinct cells in use.
    kv_cells_saved: int = 0
    #: Text block hashes of the prompts whose cells the node holds (see ``prefixes``), and the block width.
    prefix_blocks: tuple[int, ...] = ()
    prefix_block_chars: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_used_cells / self.kv_total_cells if self.kv_total_cells else 0.0


@dataclass(frozen=True)
class BatchEntry:
    """Tokens of one sequence in one llama_decode call.

    ``sampler_key`` is set when the logits after the last token are needed
    (the end of a prompt, or a decode step); it names the request's sampler.
    """

    seq_id: int
    tokens: tuple[int, ...]
    start_pos: int
    sampler_key: int | None = None


_keys = itertools.count(1)


def next_key() -> int:
    """Process-unique integer keys for requests (cheap dict keys across threads)."""
    return next(_keys)
