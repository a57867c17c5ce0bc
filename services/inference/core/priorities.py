"""Priority classes in the admission queue: order, per-class limits, bounded wait.

Interactive requests are admitted first, then normal, then batch. Each class
may be capped in the sequences it holds at once (so a batch flood always
leaves sequences for interactive traffic, since running requests are never
preempted) and in the requests it may queue (its own RESOURCE_EXHAUSTED).
A request that has waited longer than its class's ``max_wait_ms`` is ranked
with interactive traffic, by arrival, so no class starves.
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from services.inference.core.types import GenerateSpec, Priority


@dataclass(frozen=True)
class ClassLimit:
    #: Sequences this class may hold at once; 0 means no cap beyond the engine's.
    max_running: int = 0
    #: Requests of this class waiting before new ones are refused; 0 means the engine's max_queue only.
    max_waiting: int = 0
    #: After waiting this long a request ranks with interactive traffic; 0 means never promoted.
    max_wait_ms: float = 0.0


class Queued(Protocol):
    spec: GenerateSpec
    arrival: float


Q = TypeVar("Q", bound=Queued)


@dataclass(frozen=True)
class PriorityPolicy:
    limits: Mapping[Priority, ClassLimit] = field(default_factory=dict)

    def limit(self, priority: Priority) -> ClassLimit:
        return self.limits.get(priority, ClassLimit())

    def rank(self, request: Queued, now: float) -> tuple[int, float]:
        priority = request.spec.priority
        max_wait_ms = self.limit(priority).max_wait_ms
        if max_wait_ms > 0 and (now - request.arrival) * 1000.0 >= max_wait_ms:
            priority = Priority.INTERACTIVE
        return int(priority), request.arrival

    def admission_order(self, waiting: Iterable[Q], now: float) -> list[Q]:
        return sorted(waiting, key=lambda r: self.rank(r, now))

    def at_running_cap(self, priority: Priority, running: Mapping[Priority, int]) -> bool:
        cap = self.limit(priority).max_running
        return cap > 0 and running.get(priority, 0) >= cap

    def queue_full(self, priority: Priority, waiting: Mapping[Priority, int]) -> bool:
        cap = self.limit(priority).max_waiting
        return cap > 0 and waiting.get(priority, 0) >= cap


def count_by_class(requests: Iterable[Queued]) -> collections.Counter[Priority]:
    return collections.Counter(r.spec.priority for r in requests)


def default_policy(num_sequences: int, *, batch_reserved_sequences: int = 1,
                   max_waiting: Mapping[Priority, int] | None = None,
                   max_wait_ms: Mapping[Priority, float] | None = None) -> PriorityPolicy:
    """Batch may hold all but ``batch_reserved_sequences`` sequences (at least one)."""
    max_waiting = max_waiting or {}
    max_wait_ms = max_wait_ms or {}
    batch_cap = max(1, num_sequences - batch_reserved_sequences) if batch_reserved_sequences > 0 else 0
    return PriorityPolicy({
        p: ClassLimit(max_running=batch_cap if p is Priority.BATCH else 0,
                      max_waiting=max_waiting.get(p, 0), max_wait_ms=max_wait_ms.get(p, 0.0))
        for p in Priority
    })
