"""What the balancer knows about one inference node.

Health comes from the node's health Watch stream, load from GetLoad polls,
latency from the streams this client ran, failures from calls that broke.
Everything here is plain data plus arithmetic, driven by an injected clock,
so it is tested without sockets.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum


class Health(Enum):
    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"


@dataclass(frozen=True)
class LoadReport:
    """The subset of GetLoadResponse the scorer uses."""

    queue_depth: int = 0
    num_running: int = 0
    kv_usage: float = 0.0
    num_sequences: int = 0


@dataclass
class Ewma:
    """Exponentially weighted moving average; empty until the first sample."""

    alpha: float
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)


@dataclass
class EjectionPolicy:
    eject_after_failures: int
    base_s: float
    max_s: float

    def duration_s(self, level: int) -> float:
        """Ejection time for the ``level``-th ejection in a row (1-based)."""
        return min(self.max_s, self.base_s * (2 ** max(0, level - 1)))


@dataclass
class NodeState:
    address: str
    ewma_alpha: float
    health: Health = Health.UNKNOWN
    load: LoadReport = field(default_factory=LoadReport)
    # Requests this client has open on the node: fresher than any poll.
    num_inflight: int = 0
    num_picked: int = 0
    consecutive_failures: int = 0
    # How many ejections in a row; sets the next ejection's length.
    ejection_level: int = 0
    ejected_until: float = 0.0
    readmitted_at: float | None = None
    node_id: str = ""
    # Model names the node serves (from ListModels) -> their context size;
    # None until listed (or for a node without ListModels).
    models: dict[str, int] | None = None
    # The text prefixes the node holds KV cells for, as its last GetLoad
    # summarized them (chain hashes of prefix_block_chars-wide blocks; 0: the
    # node reports none, e.g. it predates summaries).
    prefix_blocks: frozenset[int] = frozenset()
    prefix_block_chars: int = 0
    # Prefix hashes this client sent here lately -> when: what the node will
    # hold before its next poll says so (oldest first, bounded by the caller).
    routed_prefixes: OrderedDict[int, float] = field(default_factory=OrderedDict)
    ttft_ms: Ewma = field(init=False)
    itl_ms: Ewma = field(init=False)

    def __post_init__(self) -> None:
        self.ttft_ms = Ewma(self.ewma_alpha)
        self.itl_ms = Ewma(self.ewma_alpha)

    # -- facts arriving -------------------------------------------------
    def set_health(self, serving: bool) -> None:
        self.health = Health.SERVING if serving else Health.NOT_SERVING

    def set_load(self, report: LoadReport) -> None:
        self.load = report

    def set_prefix_summary(self, block_chars: int, block_hashes: Iterable[int]) -> None:
        """The prefixes the node reported holding.

        Routed entries stay: were they hashed with another width, they match
        nothing (each hash covers its width's blocks) and expire.
        """
        self.prefix_block_chars = block_chars
        self.prefix_blocks = frozenset(block_hashes)

    def note_routed(self, block_hashes: Sequence[int], now: float, max_entries: int) -> None:
        """A request with these prefix hashes was sent here: until a poll shows them, expect them here."""
        for block_hash in block_hashes:
            self.routed_prefixes[block_hash] = now
            self.routed_prefixes.move_to_end(block_hash)
        while len(self.routed_prefixes) > max_entries:
            self.routed_prefixes.popitem(last=False)

    def record_ttft(self, ms: float) -> None:
        self.ttft_ms.add(ms)

    def record_itl(self, ms: float) -> None:
        self.itl_ms.add(ms)

    def record_success(self, now: float, policy: EjectionPolicy) -> None:
        self.consecutive_failures = 0
        # A node that stayed good for a full max ejection since coming back
        # starts over at the short ejection next time.
        if self.readmitted_at is not None and now - self.readmitted_at >= policy.max_s:
            self.ejection_level = 0
            self.readmitted_at = None

    def record_failure(self, now: float, policy: EjectionPolicy) -> bool:
        """Count a failed call; returns True when it ejects the node."""
        self.consecutive_failures += 1
        if self.consecutive_failures < policy.eject_after_failures or self.is_ejected(now):
            return False
        self.ejection_level += 1
        self.ejected_until = now + policy.duration_s(self.ejection_level)
        self.readmitted_at = self.ejected_until
        self.consecutive_failures = 0
        return True

    # -- questions ------------------------------------------------------
    def is_ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def is_available(self, now: float) -> bool:
        return self.health is Health.SERVING and not self.is_ejected(now)

    def prefix_depth(self, block_hashes: Sequence[int], now: float, routed_ttl_s: float) -> int:
        """Leading blocks of a request the node holds (reported) or was sent within ``routed_ttl_s`` (0: none)."""
        self._expire_routed(now - routed_ttl_s)
        for depth in range(len(block_hashes), 0, -1):
            block_hash = block_hashes[depth - 1]
            if block_hash in self.prefix_blocks or block_hash in self.routed_prefixes:
                return depth
        return 0

    def _expire_routed(self, before: float) -> None:
        # Entries are kept in routing order, so the stale ones are at the front.
        while self.routed_prefixes:
            oldest = next(iter(self.routed_prefixes.values()))
            if oldest >= before:
                return
            self.routed_prefixes.popitem(last=False)

    def serves(self, model: str) -> bool:
        """Whether a request for ``model`` may go here; "" is every node's default model.

        A node whose models are not known is offered any name; it answers
        NOT_FOUND itself if it lacks the model.
        """
        return not model or self.models is None or model in self.models

    @property
    def outstanding(self) -> int:
        """Requests ahead of a new one: the poll or our own count, whichever is larger."""
        return max(self.load.queue_depth + self.load.num_running, self.num_inflight)
