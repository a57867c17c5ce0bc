"""Result cache for idempotent tools, keyed by everything the result depends on."""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any, Callable, Generic, TypeVar

V = TypeVar("V")


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(tool: str, version: str, arguments: dict[str, Any], scope: str, state_token: str) -> str:
    """Tool, version, canonical arguments, the workspace they resolve in and the state they read."""
    material = canonical_json([tool, version, arguments, scope, state_token])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class ResultCache(Generic[V]):
    """An LRU with a TTL; entries past their TTL are never returned."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.num_hits = 0
        self.num_misses = 0

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    def get(self, key: str) -> V | None:
        entry = self.entries.get(key)
        if entry is None or entry[0] <= self.clock():
            if entry is not None:
                del self.entries[key]
            self.num_misses += 1
            return None
        self.entries.move_to_end(key)
        self.num_hits += 1
        return entry[1]

    def put(self, key: str, value: V) -> None:
        if not self.enabled:
            return
        self.entries[key] = (self.clock() + self.ttl_s, value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
