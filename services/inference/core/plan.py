"""What one engine step does (the plan) and what came back (the result)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.inference.core.types import BatchEntry, SamplingParams, TokenLogprob


class OpKind(enum.Enum):
    OPEN_SAMPLER = "open_sampler"
    CLOSE_SAMPLER = "close_sampler"
    TRUNCATE = "truncate"  # drop cells of seq_id at positions >= keep
    SAVE = "save"  # save seq_id's state under session_id
    RESTORE = "restore"  # load state into seq_id for request key
    COPY = "copy"  # share src_seq_id's cells at positions < keep with seq_id (which holds none)


@dataclass(frozen=True)
class KVOp:
    kind: OpKind
    seq_id: int = -1
    keep: int = 0
    key: int = 0
    session_id: str = ""
    state: bytes = b""
    params: SamplingParams | None = None
    src_seq_id: int = -1


@dataclass
class StepPlan:
    """Run ``ops`` in order, then decode ``entries`` in one call."""

    ops: list[KVOp] = field(default_factory=list)
    entries: list[BatchEntry] = field(default_factory=list)
    num_decode: int = 0
    num_prefill: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.ops and not self.entries


@dataclass
class StepResult:
    sampled: dict[int, int] = field(default_factory=dict)
    #: sampler key -> log-probability of its sampled token (and alternatives), for requests that asked.
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    saved: dict[str, bytes] = field(default_factory=dict)
    restored: dict[int, bool] = field(default_factory=dict)
    #: Time of the llama_decode call alone, which is what the budget learns.
    decode_ms: float = 0.0
