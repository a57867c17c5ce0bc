"""Exact response cache: canonical request hash -> stored answer, bounded by TTL and LRU.

Pure and synchronous (no grpc, no I/O): the caller decides which requests are
deterministic enough to cache and what an answer is. One cache is used from
one event loop, so no lock is taken.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.ttl_cache import TtlCache

V = TypeVar("V")


def canonical_request_hash(fields: Mapping[str, Any]) -> str:
    """A stable hex digest of a request's fields.

    Keys are sorted and floats written by ``repr`` through JSON, so two requests
    that mean the same thing hash the same whatever order their fields were
    built in; tuples and lists hash alike.
    """
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    evictions: int
    expirations: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class ResponseCache(TtlCache[V]):
    """LRU map with a per-entry time to live (``services.common.ttl_cache``), and its stats.

    ``max_entries`` bounds memory (the least recently used entry goes first);
    ``ttl_s`` bounds staleness (an entry older than that is a miss and dropped).
    ``max_entries == 0`` disables the cache: every lookup misses, nothing is kept.
    """

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        super().__init__(max_entries, ttl_s, clock)

    def stats(self) -> CacheStats:
        return CacheStats(hits=self.hits, misses=self.misses, entries=len(self.entries),
                          evictions=self.evictions, expirations=self.expirations)
