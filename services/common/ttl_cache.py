"""An LRU map with a time to live: the mechanics of the inference node's response
cache and the tools service's result cache.

Pure and synchronous (no I/O, no lock): one cache is used from one event loop.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class TtlCache(Generic[V]):
    """``max_entries`` bounds memory (the least recently used entry goes first);
    ``ttl_s`` bounds staleness (an entry that old is a miss and dropped). A bound
    of 0 disables the cache: every lookup misses, nothing is kept."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        #: key -> (when it was stored, value), least recently used first.
        self.entries: collections.OrderedDict[str, tuple[float, V]] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = self.expirations = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.ttl_s > 0

    def get(self, key: str) -> V | None:
        entry = self.entries.get(key)
        if entry is not None and self.clock() - entry[0] >= self.ttl_s:
            del self.entries[key]
            self.expirations += 1
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: str, value: V) -> None:
        if not self.enabled:
            return
        self.entries[key] = (self.clock(), value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self.entries)
