"""Exact response cache: canonical request hash -> stored answer, bounded by TTL and LRU.

Pure and synchronous (no grpc, no I/O): the caller decides which requests are
deterministic enough to cache and what an answer is. One cache is used from
one event loop, so no lock is taken.
"""
from __future__ import annotations

import collections
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

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


class ResponseCache(Generic[V]):
    """LRU map with a per-entry time to live.

    ``max_entries`` bounds memory (the least recently used entry goes first);
    ``ttl_s`` bounds staleness (an entry older than that is a miss and dropped).
    ``max_entries == 0`` disables the cache: every lookup misses, nothing is kept.
    """

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: collections.OrderedDict[str, tuple[float, V]] = collections.OrderedDict()
        self._hits = self._misses = self._evictions = self._expirations = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry[0] >= self.ttl_s:
            del self._entries[key]
            self._expirations += 1
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry[1]

    def put(self, key: str, value: V) -> None:
        if not self.enabled:
            return
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> CacheStats:
        return CacheStats(hits=self._hits, misses=self._misses, entries=len(self._entries),
                          evictions=self._evictions, expirations=self._expirations)
